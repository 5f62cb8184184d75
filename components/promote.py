from kfp import dsl

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(config: str, gate_outputs: str) -> str:
    """Confirm the promoted version holds the alias in the registry and announce it (runs only when
    the gate passed).

    Args:
        config: the pipeline config, a YAML document or a path/s3:// URI of one.
        gate_outputs: the gate step's outputs (JSON).

    Returns:
        The announcement.
    """
    import json

    from tcapguard.orchestration import load_config, promotion_notice

    tracking_uri = load_config(config).tracking.tracking_uri
    notice = promotion_notice(json.loads(gate_outputs), tracking_uri=tracking_uri)
    print(notice["message"])
    return notice["message"]


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def reject(gate_outputs: str):
    """Fail the run when the gate failed (fail closed): the version is registered and tagged, no
    alias moved, and the run must not read as a success.

    Args:
        gate_outputs: the gate step's outputs (JSON).
    """
    import json

    from tcapguard.gate import GateError

    outputs = json.loads(gate_outputs)
    reasons = "; ".join(outputs["reasons"]) or "no reason recorded"
    raise GateError(
        f"{outputs['model_name']} version {outputs['version']} failed the backdoor gate: {reasons}"
    )
