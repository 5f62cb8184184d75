from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Markdown, Output

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def gate(config: str, summary: Output[Markdown]) -> NamedTuple("GateOutputs", passed=bool, outputs=str):
    """Record the run in MLflow, register the candidate and let the policy decide; the alias moves
    only on a pass. A failed verdict is an output (the pipeline branches on it), not an error.

    Args:
        config: the pipeline config, a YAML document or a path/s3:// URI of one.
        summary: the verdict, its reasons and every check, as markdown.

    Returns:
        passed: the verdict.
        outputs: the step's outputs as JSON (run id, version, alias, reasons).
    """
    import json
    from typing import NamedTuple

    from tcapguard.orchestration import gate_markdown, run_step

    outputs = run_step(config, "gate")
    with open(summary.path, "w") as handle:
        handle.write(gate_markdown(outputs))
    result = NamedTuple("GateOutputs", passed=bool, outputs=str)  # noqa: UP014 (matches the signature)
    return result(bool(outputs["passed"]), json.dumps(outputs))
