"""Tracking helpers against a real MLflow server (and the server-less local sqlite store): nested
runs, params without secrets, finite metrics only, artifacts, and a tiny model that registers and
loads back through ``load_model("models:/<name>@champion")``."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from tcapguard import tracking
from tcapguard.models import ModelLoadError, load_model
from tcapguard.tracking import TrackingError


@dataclass
class Inner:
    lora_r: int = 8
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class Outer:
    name: str = "run"
    store: str = "s3://user:hunter2@bucket/prefix"
    aws_secret_access_key: str = "hunter2"
    inner: Inner = field(default_factory=Inner)


@pytest.fixture
def fake_model(tmp_path):
    """A directory shaped like save_pretrained output (the gate never reads the weights)."""
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"weights")
    (path / "processor_config.json").write_text("{}")
    return path


def test_flatten_params_masks_secrets():
    params = tracking.flatten_params(Outer())
    assert params == {
        "name": "run",
        "store": "s3://***@bucket/prefix",
        "aws_secret_access_key": "***",
        "inner.lora_r": "8",
        "inner.targets": '["q_proj", "v_proj"]',
    }
    with pytest.raises(TypeError, match="dataclass instance or a mapping"):
        tracking.flatten_params([1, 2])


def test_redact_uri():
    assert tracking.redact_uri("https://me:pw@mlflow.example/x?token=abc&a=1") == (
        "https://***@mlflow.example/x?token=%2A%2A%2A&a=1"
    )
    assert tracking.redact_text("request to http://u:pw@h:1/api failed; s3://k:s@b/x") == (
        "request to http://***@h:1/api failed; s3://***@b/x"
    )
    assert "pw" not in str(TrackingError("cannot reach https://u:pw@host"))
    for plain in ("http://127.0.0.1:5000", "sqlite:////abs/mlflow.db", "sqlite:///rel.db?timeout=5"):
        assert tracking.redact_uri(plain) == plain


def test_parse_model_uri():
    assert tracking.parse_model_uri("models:/guard/3") == ("guard", "3", None)
    assert tracking.parse_model_uri("models:/guard@champion") == ("guard", None, "champion")
    for bad in ("models:/guard", "models:/guard/latest", "runs:/abc/model", "models:/m-123abc"):
        with pytest.raises(TrackingError, match="expected models:/<name>/<version>"):
            tracking.parse_model_uri(bad)


def test_runs_params_metrics_artifacts(mlflow_server, tmp_path):
    report = tmp_path / "reports"
    report.mkdir()
    (report / "eval.json").write_text('{"asr": 0.01}')
    (tmp_path / "flagged.csv").write_text("id,score\na,0.9\n")
    with tracking.pipeline_run(
        "tracking-tests", tracking_uri=mlflow_server.uri, tags={"world": "tiny"}
    ) as parent:
        with tracking.step_run("filter") as step:
            tracking.log_config(Outer(), name="filter")
            tracking.log_metrics({"flagged_fraction": 0.1, "n_flagged": 3})
            tracking.log_artifacts(tmp_path / "flagged.csv", "tables")
        tracking.log_artifacts(report, "reports")
        tracking.log_metrics({"asr": 0.01})
    client = MlflowClient(mlflow_server.uri)
    child = client.get_run(step.info.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags[tracking.STEP_TAG] == "filter"
    assert child.data.metrics == {"flagged_fraction": 0.1, "n_flagged": 3.0}
    assert child.data.params["filter.inner.lora_r"] == "8"
    assert "hunter2" not in json.dumps(child.data.params)
    assert child.info.experiment_id == top_experiment(client, parent.info.run_id)
    config = json.loads(
        Path(client.download_artifacts(step.info.run_id, "config/filter.json", tmp_path)).read_text()
    )
    assert config["inner"]["targets"] == ["q_proj", "v_proj"] and "hunter2" not in json.dumps(config)
    assert [a.path for a in client.list_artifacts(child.info.run_id, "tables")] == ["tables/flagged.csv"]
    top = client.get_run(parent.info.run_id)
    assert top.data.metrics == {"asr": 0.01} and top.data.tags["world"] == "tiny"
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "reports")] == ["reports/eval.json"]
    assert top.info.status == "FINISHED"


def top_experiment(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.experiment_id


def test_failed_step_marks_run_failed(mlflow_server):
    with (
        pytest.raises(RuntimeError, match="boom"),
        tracking.pipeline_run("tracking-tests", tracking_uri=mlflow_server.uri) as parent,
        tracking.step_run("train") as step,
    ):
        raise RuntimeError("boom")
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(step.info.run_id).info.status == "FAILED"
    assert client.get_run(parent.info.run_id).info.status == "FAILED"


def test_step_needs_a_pipeline_run():
    assert mlflow.active_run() is None
    with pytest.raises(TrackingError, match="inside pipeline_run"), tracking.step_run("filter"):
        pass


def test_non_finite_metrics_are_refused(mlflow_server):
    with tracking.pipeline_run("tracking-tests", tracking_uri=mlflow_server.uri) as run:
        with pytest.raises(TrackingError, match="not finite numbers") as info:
            tracking.log_metrics({"asr": float("nan"), "clean_exact_match": 0.9, "flag": True})
        assert "'asr': 'nan'" in str(info.value) and "'flag': 'True'" in str(info.value)
        logged = tracking.log_metrics({"asr": float("inf"), "clean_exact_match": 0.9}, on_invalid="mark")
    assert logged == {"clean_exact_match": 0.9}
    data = MlflowClient(mlflow_server.uri).get_run(run.info.run_id).data
    assert data.metrics == {"clean_exact_match": 0.9}  # nothing from the refused batch
    assert json.loads(data.tags[tracking.INVALID_METRICS_TAG]) == {"asr": "inf"}


def test_bad_artifacts_and_model_directories(mlflow_server, tmp_path, fake_model):
    with tracking.pipeline_run("tracking-tests", tracking_uri=mlflow_server.uri):
        with pytest.raises(TrackingError, match="no such file"):
            tracking.log_artifacts(tmp_path / "missing.json")
        (fake_model / "model.safetensors").unlink()
        with pytest.raises(TrackingError, match=r"no \*\.safetensors"):
            tracking.log_model_directory(fake_model)
        with pytest.raises(TrackingError, match=r"no config\.json"):
            tracking.log_model_directory(tmp_path)
        with pytest.raises(TrackingError, match="log it with log_model_directory first"):
            tracking.register_model(f"never-{uuid.uuid4().hex[:8]}")


def test_model_version_tags():
    tags = tracking.model_version_tags(
        dataset_hash="ab12", attack_suite=["badnet", "blend"], metrics={"asr": 0.0123}
    )
    assert tags == {
        "dataset_sha256": "ab12",
        "attack_suite": "badnet,blend",
        "backdoor_gate": "pending",
        "metric.asr": "0.0123",
    }


def test_tiny_model_registers_and_loads_by_alias(mlflow_server, tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.uri)
    monkeypatch.setenv("TCAPGUARD_CACHE", str(tmp_path / "cache"))
    name = f"tiny-{uuid.uuid4().hex[:8]}"
    source = tiny_models.path("llava")
    tags = tracking.model_version_tags(dataset_hash="ab12", attack_suite="badnet", metrics={"asr": 0.0})
    with tracking.pipeline_run("tracking-tests", tracking_uri=mlflow_server.uri):
        version = tracking.log_and_register_model(source, name, tags=tags)
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    assert client.get_model_version(name, version.version).tags["dataset_sha256"] == "ab12"
    client.set_registered_model_alias(name, "champion", version.version)

    model, processor = load_model(f"models:/{name}@champion")
    reference, _ = load_model(source)
    assert processor.chat_template
    for (key, value), (_, expected) in zip(
        model.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        assert torch.equal(value, expected), key
    cached = list((tmp_path / "cache" / "models").iterdir())
    load_model(f"models:/{name}/{version.version}")  # the same version: served from the cache
    assert list((tmp_path / "cache" / "models").iterdir()) == cached

    with pytest.raises(ModelLoadError, match=r"has no alias 'prod'.*aliases: \{'champion': '1'\}"):
        load_model(f"models:/{name}@prod")
    with pytest.raises(ModelLoadError, match="has no version 7"):
        load_model(f"models:/{name}/7")
    with pytest.raises(ModelLoadError, match="no registered model named 'nope-"):
        load_model(f"models:/nope-{uuid.uuid4().hex[:6]}@champion")


def test_local_store_without_server(tmp_path, monkeypatch, fake_model):
    """The demo's default: sqlite under TCAPGUARD_MLFLOW_DIR with artifacts beside it, no server."""
    monkeypatch.setenv("TCAPGUARD_MLFLOW_DIR", str(tmp_path / "store"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert not mlflow.is_tracking_uri_set()  # pipeline_run restored the URI of earlier tests
    uri = tracking.resolve_tracking_uri()
    assert uri == f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    with tracking.pipeline_run("local"):
        version = tracking.log_and_register_model(fake_model, "local-model")
    assert not mlflow.is_tracking_uri_set()
    assert version.source.startswith((tmp_path / "store" / "artifacts").as_uri())
    path = tracking.download_model_version(
        "models:/local-model/1", cache_dir=tmp_path / "cache", tracking_uri=uri
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "config.json",
        "model.safetensors",
        "processor_config.json",
    ]


def test_an_explicit_sqlite_store_keeps_artifacts_beside_its_database(tmp_path, monkeypatch):
    """Not in ./mlruns under the working directory (MLflow's default), which a later `mlflow ui`
    started elsewhere could not find and which litters a checkout."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'db' / 'mlflow.db'}"
    (tmp_path / "db").mkdir()
    (tmp_path / "report.json").write_text("{}")
    with tracking.pipeline_run("explicit", tracking_uri=uri) as run:
        tracking.log_artifacts(tmp_path / "report.json", "reports")
    location = tracking.client(uri).get_experiment_by_name("explicit").artifact_location
    assert location == (tmp_path / "db" / "artifacts").as_uri()
    assert (
        tmp_path / "db" / "artifacts" / run.info.run_id / "artifacts" / "reports" / "report.json"
    ).is_file()
    assert not (tmp_path / "mlruns").exists()
