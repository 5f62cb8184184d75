"""Kubeflow pipelines over the tcapguard components (compiled YAML next to the source)."""
