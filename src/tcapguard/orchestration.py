"""What the orchestrator adapters share: the Kubeflow components and the Airflow DAG each make one
call here per task, so neither holds step logic of its own.

A task gets the pipeline config as one string, a YAML document or a path/URI of one (the form both
orchestrators pass around as a parameter), runs one step of :data:`tcapguard.pipeline.STEP_FUNCTIONS`
on it and hands back the step's small JSON outputs. The plan of output directories follows from the
config, so a step finds its inputs where the upstream task left them, and a retried task reuses what
is finished.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from tcapguard.pipeline import PipelineConfig, PipelineConfigError

__all__ = [
    "describe_artifact",
    "finetune_seeds",
    "gate_markdown",
    "load_config",
    "promotion_notice",
    "run_step",
    "to_yaml",
]


def load_config(
    spec: str,
    *,
    model: str | None = None,
    train: str | None = None,
    test: str | None = None,
    policy: Mapping[str, Any] | str | None = None,
    work_dir: str | None = None,
) -> PipelineConfig:
    """The pipeline config from ``spec`` (a YAML document, or a path/``s3://`` URI of one) with the
    run's overrides applied: ``model`` (model.source), ``train``/``test`` (data), ``work_dir``, and
    ``policy``, either gate fields merged onto the config's gate or a policy file (path/URI) that
    replaces it. Empty overrides are ignored, so a trigger form's blank fields change nothing."""
    import yaml

    if not isinstance(spec, str) or not spec.strip():
        raise PipelineConfigError("config: expected a YAML document or a path/URI of one, got nothing")
    try:
        data = yaml.safe_load(spec)
    except yaml.YAMLError as err:
        raise PipelineConfigError(f"config parameter: not valid YAML: {err}") from err
    if isinstance(data, str):  # a single scalar: a path or URI
        source = data
        data = PipelineConfig.from_yaml(data).to_dict()
    elif isinstance(data, dict):
        source = "config parameter"
    else:
        raise PipelineConfigError(
            f"config parameter: expected a mapping of sections or a path/URI, got {type(data).__name__}"
        )
    data = {k: dict(v) if isinstance(v, Mapping) else v for k, v in data.items()}
    for section, key, value in (("model", "source", model), ("data", "train", train), ("data", "test", test)):
        if value:
            data.setdefault(section, {})[key] = value
    if work_dir:
        data["work_dir"] = work_dir
    if isinstance(policy, str) and policy.strip():
        from tcapguard.gate import GatePolicy

        data["gate"] = GatePolicy.from_file(policy).to_dict()
    elif isinstance(policy, Mapping) and policy:
        data["gate"] = {**data.get("gate", {}), **policy}
    elif policy not in (None, "", {}):
        raise PipelineConfigError(f"policy: expected gate fields or a policy file, got {policy!r}")
    return PipelineConfig.from_dict(data, source=source)


def to_yaml(config: PipelineConfig) -> str:
    """The resolved config as one YAML document (what a pod or component gets as its parameter)."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def run_step(
    spec: str | PipelineConfig, name: str, *, worker: int = 0, workers: int = 1, seed: int | None = None
) -> dict[str, Any]:
    """Run step ``name`` for the config and return its outputs, JSON-safe: the profile step for
    ``worker`` of ``workers``, the fine-tune at ``seed`` (one of :func:`finetune_seeds`). A step the
    config switches off (see :func:`tcapguard.pipeline.step_applies`) returns ``{"skipped": True}``
    without running."""
    from tcapguard.pipeline import STEP_FUNCTIONS, step_applies, step_finetune, step_profile

    config = _config(spec)
    if seed is not None and name != "finetune":
        raise ValueError(f"only the fine-tune step takes a seed, not {name!r}")
    if not step_applies(config, name):
        return {"skipped": True, "step": name}
    if name == "profile":
        outputs = step_profile(config, worker=worker, workers=workers)
    elif name == "finetune":
        outputs = step_finetune(config, seed=seed)
    else:
        outputs = STEP_FUNCTIONS[name](config)
    return json.loads(json.dumps(outputs, default=str))


def finetune_seeds(spec: str | PipelineConfig) -> list[int]:
    """The seeds of the config's fine-tune tasks (one task each): the orchestrators' fan-out."""
    from tcapguard import pipeline

    return pipeline.finetune_seeds(_config(spec))


def _config(spec: str | PipelineConfig) -> PipelineConfig:
    return spec if isinstance(spec, PipelineConfig) else load_config(spec)


def describe_artifact(artifact: Any, uri: str | None, outputs: Mapping[str, Any]) -> None:
    """Point an orchestrator's output artifact (a KFP ``Dataset``/``Model``...: anything with
    ``metadata`` and ``path``) at a step's output: ``metadata["uri"]`` names the directory, and the
    artifact's file holds the step's outputs as JSON, so the artifact is a real record of the step."""
    artifact.metadata["uri"] = uri or ""
    for key, value in outputs.items():
        if isinstance(value, str | int | float | bool):
            artifact.metadata[key] = value
    os.makedirs(os.path.dirname(artifact.path) or ".", exist_ok=True)
    with open(artifact.path, "w") as handle:
        json.dump(dict(outputs), handle, indent=1)


def gate_markdown(outputs: Mapping[str, Any]) -> str:
    """The gate step's verdict as markdown: the decision's table plus the version and alias."""
    from tcapguard.gate import Check, Decision

    body = outputs["decision"]
    decision = Decision(
        passed=bool(body["passed"]),
        reasons=list(body["reasons"]),
        checks=[Check(**check) for check in body["checks"]],
    )
    action = (
        f"alias `{outputs['alias']}` -> version {outputs['version']}"
        if outputs["promoted"]
        else f"alias `{outputs['alias']}` not moved"
    )
    return decision.markdown() + f"\n{outputs['model_name']} version {outputs['version']}: {action}.\n"


def promotion_notice(outputs: Mapping[str, Any], *, tracking_uri: str | None = None) -> dict[str, str]:
    """Confirm in the registry that the gate's alias now names the judged version, and say so.

    The gate step moved the alias; this is the promotion task's check that it holds (fail closed:
    a gate that did not pass, or an alias found elsewhere, raises :class:`tcapguard.gate.GateError`)."""
    from tcapguard.gate import GateError
    from tcapguard.tracking import client, resolve_tracking_uri

    if not (outputs.get("passed") and outputs.get("promoted")):
        raise GateError(f"version {outputs.get('version')} did not pass the gate; nothing to promote")
    name, version, alias = outputs["model_name"], str(outputs["version"]), outputs["alias"]
    holder = client(resolve_tracking_uri(tracking_uri)).get_model_version_by_alias(name, alias)
    if str(holder.version) != version:
        raise GateError(f"alias {alias!r} of {name!r} names version {holder.version}, not {version}")
    message = f"{name} version {version} passed the backdoor gate and holds @{alias} (models:/{name}@{alias})"
    return {"model_name": name, "version": version, "alias": alias, "message": message}
