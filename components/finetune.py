from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from components.images import IMAGE_CUDA


@dsl.component(base_image=IMAGE_CUDA, install_kfp_package=False)
def finetune(config: str, clean_train: Input[Dataset], seed: int, model: Output[Model]) -> str:
    """Fine-tune the base model again, on the cleaned upload, at one seed: the candidate the gate
    judges, or one of those the select step chooses from.

    Args:
        config: the pipeline config, a YAML document or a path/s3:// URI of one.
        clean_train: the cleaned upload (lineage; the step finds it through the config's plan).
        seed: the fine-tune's seed (one of the finetune_seeds component's).
        model: the fine-tuned model (metadata["uri"] names its directory).

    Returns:
        The step's outputs as JSON.
    """
    import json

    from tcapguard.orchestration import describe_artifact, run_step

    outputs = run_step(config, "finetune", seed=seed)
    describe_artifact(model, outputs["model"], outputs)
    return json.dumps(outputs)
