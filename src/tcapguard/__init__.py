"""tcapguard: keep backdoors out of fine-tuned multimodal LLMs."""

__version__ = "0.1.0"
