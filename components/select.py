from typing import List  # noqa: UP035 (the form KFP documents for list inputs)

from kfp import dsl
from kfp.dsl import Input, Model, Output

from components.images import IMAGE_CUDA


@dsl.component(base_image=IMAGE_CUDA, install_kfp_package=False)
def select_model(config: str, candidates: Input[List[Model]], model: Output[Model]) -> str:  # noqa: UP006
    """Keep one of the fine-tunes: the lowest residual ASR on the validation split within the clean
    bar (tcapguard.selection). Without selection.seeds there is one fine-tune, passed on as it is.

    Args:
        config: the pipeline config, a YAML document or a path/s3:// URI of one.
        candidates: the fine-tuned models, one per seed (collected from the fan-out).
        model: the kept model (metadata["uri"] names its directory).

    Returns:
        The step's outputs as JSON.
    """
    import json

    from tcapguard.orchestration import describe_artifact, run_step

    outputs = run_step(config, "select")
    if outputs.get("skipped"):
        (only,) = candidates
        outputs = {"model": only.metadata["uri"], "seed": only.metadata.get("seed")}
    describe_artifact(model, outputs["model"], outputs)
    return json.dumps(outputs)
