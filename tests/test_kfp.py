"""The Kubeflow adapter: the committed package is the compiled pipeline, and the pipeline runs end to
end on the local runner (kfp.local SubprocessRunner: ParallelFor and If/Else run; the kfp-kubernetes
settings are ignored there, so secrets, PVC and GPUs are checked in the compiled YAML instead)."""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))  # components/ and pipelines/ live beside src/

from pipelines import tcapguard_pipeline as tp  # noqa: E402

from orchestrator_fixtures import FAILING, PASSING, as_yaml, tiny_config  # noqa: E402


def _package() -> tuple[dict, dict]:
    """The compiled pipeline spec and its Kubernetes platform spec (two YAML documents)."""
    spec, platform = yaml.safe_load_all(tp.COMPILED.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_the_committed_package_is_up_to_date(tmp_path):
    fresh = tp.compile_pipeline(tmp_path / "pipeline.yaml").read_text()
    assert fresh == tp.COMPILED.read_text(), (
        "pipelines/tcapguard_pipeline.yaml is stale: run `python -m pipelines.tcapguard_pipeline`"
    )


def test_the_package_asks_for_gpus_secrets_and_the_work_volume():
    package, platform = _package()
    containers = {name: spec["container"] for name, spec in package["deploymentSpec"]["executors"].items()}
    gpu = {name for name, c in containers.items() if c.get("resources", {}).get("accelerator")}
    assert gpu == {
        f"exec-{n}"
        for n in ("probe-finetune", "profile-attention", "finetune", "select-model", "evaluate", "evaluate-2")
    }
    assert all(c["image"].endswith("-cuda") == (name in gpu) for name, c in containers.items())
    for name in gpu:
        assert platform[name]["nodeSelector"]["labels"] == {"nvidia.com/gpu.present": "true"}
    for name, settings in platform.items():
        secrets = {s["secretName"] for s in settings["secretAsEnv"]}
        assert secrets == {tp.S3_SECRET, tp.MLFLOW_SECRET}, name
        assert settings["pvcMount"][0]["mountPath"] == tp.WORK_MOUNT
    assert not any("pip install" in " ".join(c["command"]) for c in containers.values())


@pytest.fixture
def local_kfp(tmp_path, monkeypatch):
    import builtins

    from kfp import local

    # kfp.local (2.17.3) indents a task's output by replacing builtins.print for the task, and after
    # this pipeline's local run its wrapper was still in place: every later print in the test
    # process wrote four spaces to stdout first (a CLI test that expects an empty stdout failed).
    # monkeypatch puts the real print back at teardown.
    monkeypatch.setattr(builtins, "print", builtins.print)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp-root"))
    return tmp_path / "kfp-root"


def _task_outputs(root: Path) -> dict[str, Path]:
    """Each task's output directory of the latest run (the local runner's layout)."""
    run = max(root.iterdir(), key=lambda p: p.stat().st_mtime)
    return {p.name: p for p in run.iterdir() if p.is_dir()}


@pytest.mark.slow
def test_the_pipeline_runs_locally_and_takes_the_gate_branch(tmp_path, tiny_models, mlflow_server, local_kfp):
    from mlflow import MlflowClient

    name = f"kfp-{uuid.uuid4().hex[:8]}"
    config = tiny_config(
        tmp_path, tiny_models.path("llava"), tracking_uri=mlflow_server.uri, registered_model=name
    )
    tp.tcapguard_backdoor_gate(config=as_yaml(config, **PASSING), num_workers=2)  # raises if a task fails
    tasks = _task_outputs(local_kfp)
    assert {"promote", "gate", "merge-profile", "evaluate", "evaluate-2"} <= set(tasks)
    assert {"for-loop-1-iteration-0", "for-loop-1-iteration-1"} <= set(tasks)  # two profiling workers
    assert "reject" not in tasks
    assert sorted(p.name for p in (tmp_path / "runs").glob("profile-*/shard-*.npz")) == [
        f"shard-{i:05d}.npz" for i in range(3)
    ]
    summary = (tasks["gate"] / "summary").read_text()
    assert "PASSED" in summary
    client = MlflowClient(mlflow_server.uri)
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    metrics = json.loads((tasks["evaluate-2"] / "executor_output.json").read_text())
    assert "asr" in metrics["artifacts"]["metrics"]["artifacts"][0]["metadata"]

    # The same upload under a policy it cannot meet: the steps before the gate are reused, the gate
    # registers version 2 and fails, the Else branch fails the run, and the alias stays on version 1.
    with pytest.raises(RuntimeError, match="reject"):  # the Else branch's task failed the run
        tp.tcapguard_backdoor_gate(config=as_yaml(config, **FAILING), num_workers=2)
    tasks = _task_outputs(local_kfp)
    assert "gate" in tasks and "promote" not in tasks
    assert "FAILED" in (tasks["gate"] / "summary").read_text()
    assert client.get_model_version(name, "2").tags["backdoor_gate"] == "failed"
    assert client.get_model_version_by_alias(name, "champion").version == "1"
