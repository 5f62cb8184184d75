from kfp import dsl
from kfp.dsl import Dataset, Model, Output

from components.images import IMAGE_CUDA


@dsl.component(base_image=IMAGE_CUDA, install_kfp_package=False)
def probe_finetune(config: str, upload: Output[Dataset], probe_model: Output[Model]) -> str:
    """Fine-tune the base model on the checked upload: the probe whose attention is profiled.

    Args:
        config: the pipeline config, a YAML document or a path/s3:// URI of one.
        upload: the upload as checked (metadata["uri"] names the file).
        probe_model: the probe model (metadata["uri"] names its directory).

    Returns:
        The step's outputs as JSON.
    """
    import json

    from tcapguard.orchestration import describe_artifact, run_step

    outputs = run_step(config, "probe-finetune")
    describe_artifact(upload, outputs["upload"], outputs)
    describe_artifact(probe_model, outputs["model"], outputs)
    return json.dumps(outputs)
