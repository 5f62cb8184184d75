from kfp import dsl
from kfp.dsl import Dataset, Input, Metrics, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def tcap_filter(
    config: str, profile: Input[Dataset], clean_train: Output[Dataset], filter_metrics: Output[Metrics]
) -> str:
    """Flag suspected poison from the attention profile and drop it from the upload.

    Args:
        config: the pipeline config, a YAML document or a path/s3:// URI of one.
        profile: the attention profile (lineage; the step finds it through the config's plan).
        clean_train: the cleaned upload (metadata["uri"] names the file).
        filter_metrics: flagged count and fraction.

    Returns:
        The step's outputs as JSON.
    """
    import json

    from tcapguard.orchestration import describe_artifact, run_step

    outputs = run_step(config, "filter")
    describe_artifact(clean_train, outputs["clean_train"], outputs)
    for key, value in outputs["metrics"].items():
        filter_metrics.log_metric(key, value)
    return json.dumps(outputs)
