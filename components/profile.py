from kfp import dsl
from kfp.dsl import Input, Model

from components.images import IMAGE_CUDA


@dsl.component(base_image=IMAGE_CUDA, install_kfp_package=False)
def profile_attention(config: str, probe_model: Input[Model], worker: int, workers: int) -> str:
    """Profile one worker's shards of the upload with the probe model (resumable shard by shard).

    Args:
        config: the pipeline config, a YAML document or a path/s3:// URI of one.
        probe_model: the probe model (lineage; the step finds it through the config's plan).
        worker: this worker's index in [0, workers).
        workers: how many workers share the shards.

    Returns:
        The step's outputs as JSON.
    """
    import json

    from tcapguard.orchestration import run_step

    return json.dumps(run_step(config, "profile", worker=worker, workers=workers))
