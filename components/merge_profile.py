from kfp import dsl
from kfp.dsl import Dataset, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_profile(config: str, profile: Output[Dataset]) -> str:
    """Check that every worker's shards are there and mark the attention profile finished.

    Args:
        config: the pipeline config, a YAML document or a path/s3:// URI of one.
        profile: the attention profile (metadata["uri"] names its directory).

    Returns:
        The step's outputs as JSON.
    """
    import json

    from tcapguard.orchestration import describe_artifact, run_step

    outputs = run_step(config, "merge-profile")
    describe_artifact(profile, outputs.get("profile"), outputs)
    return json.dumps(outputs)
