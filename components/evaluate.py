from kfp import dsl
from kfp.dsl import Input, Metrics, Model, Output

from components.images import IMAGE_CUDA


@dsl.component(base_image=IMAGE_CUDA, install_kfp_package=False)
def evaluate(config: str, model: Input[Model], which: str, metrics: Output[Metrics]) -> str:
    """Evaluate the final model (which="final") or the probe model ("probe", the "before" figures):
    ASR, residual ASR, clean score, detection figures where ground truth is given.

    Args:
        config: the pipeline config, a YAML document or a path/s3:// URI of one.
        model: the model evaluated (lineage; the step finds it through the config's plan).
        which: "final" (step evaluate) or "probe" (step evaluate-probe).
        metrics: every finite metric of the evaluation.

    Returns:
        The step's outputs as JSON.
    """
    import json

    from tcapguard.orchestration import run_step

    outputs = run_step(config, {"final": "evaluate", "probe": "evaluate-probe"}[which])
    for key, value in outputs.get("metrics", {}).items():
        if isinstance(value, int | float) and value == value:
            metrics.log_metric(key, value)
    return json.dumps(outputs)
