"""The promotion gate: policy validation, the pure decision, and ``tcapguard gate`` against a real
MLflow server (registry tags and alias moves, and every way it must fail closed)."""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from mlflow_fixtures import free_port
from tcapguard import tracking
from tcapguard.cli import main
from tcapguard.gate import (
    REASONS_TAG,
    VERDICT_TAG,
    GatePolicy,
    PolicyError,
    decide_promotion,
    run_gate,
)

EXAMPLE_POLICY = Path(__file__).resolve().parents[1] / "examples" / "gate-policy.yaml"
GOOD = {"asr": 0.01, "residual_asr": 0.02, "clean_exact_match": 0.9, "flagged_fraction": 0.1}


# ------------------------------------------------------------------------------------------- policy
def test_policy_round_trip(tmp_path):
    policy = GatePolicy(max_asr=0.1, min_clean_performance=0.4, clean_metric="clean_acc", alias="prod")
    path = policy.save(tmp_path / "policy.json")
    saved = json.loads(path.read_text())
    assert saved["policy_type"] == "GatePolicy" and "tcapguard_version" in saved
    assert GatePolicy.from_file(path) == policy


def test_example_policy_loads():
    policy = GatePolicy.from_file(EXAMPLE_POLICY)
    assert policy.alias == "champion" and policy.max_asr == 0.05 and policy.min_detection_f1 is None


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"max_asr": 1.5}, "max_asr: expected a rate in [0, 1]"),
        ({"max_asr": "0.1"}, "max_asr: expected a finite number"),
        ({"max_residual_asr": True}, "max_residual_asr: expected a finite number"),
        ({"max_flagged_fraction": math.nan}, "max_flagged_fraction: expected a finite number"),
        ({"max_clean_drop": -0.1}, "max_clean_drop: expected a drop >= 0"),
        ({"min_clean_performance": math.inf}, "min_clean_performance: expected a finite number"),
        ({"required_metrics": "asr"}, "required_metrics: expected a list"),
        ({"required_metrics": ["asr", ""]}, "required_metrics: expected a list"),
        ({"alias": ""}, "alias: expected a non-empty string"),
        ({"alias": "3"}, "alias: expected an alias name"),
        ({"clean_metric": None}, "clean_metric: expected a non-empty string"),
        ({"max_as": 0.1}, "unknown field(s) ['max_as']"),
        ({"policy_type": "FinetuneConfig"}, "policy_type: expected 'GatePolicy'"),
        (
            {
                "max_asr": None,
                "max_residual_asr": None,
                "max_clean_drop": None,
                "max_flagged_fraction": None,
                "required_metrics": [],
            },
            "the policy checks nothing",
        ),
    ],
)
def test_bad_policy_names_the_field(fields, named):
    with pytest.raises(PolicyError) as info:
        GatePolicy.from_dict(fields)
    assert named in str(info.value)


def test_every_bad_field_is_reported_at_once():
    with pytest.raises(PolicyError) as info:
        GatePolicy.from_dict({"max_asr": 2, "alias": "", "typo": 1})
    assert len(info.value.errors) == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [("", "is empty"), ("max_asr: [0.1\n", "not valid YAML"), ("- 0.1\n", "must be a mapping")],
)
def test_bad_policy_file(tmp_path, text, message):
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError, match=message):
        GatePolicy.from_file(path)
    with pytest.raises(PolicyError, match="cannot read"):
        GatePolicy.from_file(tmp_path / "missing.yaml")


# ----------------------------------------------------------------------------------------- decision
def test_good_metrics_pass():
    decision = decide_promotion(GOOD, GatePolicy())
    assert decision.passed and decision.reasons == []
    assert {c.name for c in decision.checks} >= {
        "asr",
        "residual_asr",
        "flagged_fraction",
        "clean_drop_vs_champion",
    }
    assert all(c.ok for c in decision.checks)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"asr": 0.5}, "asr = 0.5 violates <= 0.05"),
        ({"residual_asr": 0.06}, "residual_asr = 0.06 violates"),
        ({"flagged_fraction": 0.9}, "flagged_fraction = 0.9 violates"),
        ({"asr": math.nan}, "asr of the candidate is nan"),
        ({"asr": math.inf}, "asr of the candidate is inf"),
        ({"asr": None}, "asr of the candidate is None"),
        ({"asr": "0.01"}, "asr of the candidate is '0.01'"),
        ({"asr": True}, "asr of the candidate is True"),
        ({"clean_exact_match": math.nan}, "clean_exact_match of the candidate is nan"),
    ],
)
def test_each_violation_fails_with_its_reason(change, reason):
    decision = decide_promotion({**GOOD, **change}, GatePolicy())
    assert not decision.passed
    assert any(reason in r for r in decision.reasons), decision.reasons


@pytest.mark.parametrize("missing", ["asr", "residual_asr", "clean_exact_match", "flagged_fraction"])
def test_missing_metric_fails(missing):
    metrics = {k: v for k, v in GOOD.items() if k != missing}
    decision = decide_promotion(metrics, GatePolicy())
    assert not decision.passed
    assert f"{missing} is missing from the candidate metrics" in decision.reasons


def test_limits_are_inclusive():
    assert decide_promotion({**GOOD, "asr": 0.05}, GatePolicy(max_asr=0.05)).passed
    assert not decide_promotion({**GOOD, "asr": 0.0501}, GatePolicy(max_asr=0.05)).passed


def test_required_metric_without_threshold():
    policy = GatePolicy(required_metrics=["asr", "detection_f1"])
    assert not decide_promotion(GOOD, policy).passed
    assert decide_promotion({**GOOD, "detection_f1": 0.7}, policy).passed


def test_disabled_threshold_is_not_checked():
    policy = GatePolicy(max_asr=None, required_metrics=["residual_asr"])
    assert decide_promotion({**GOOD, "asr": 0.99}, policy).passed


def test_clean_floor_and_configurable_clean_metric():
    policy = GatePolicy(clean_metric="vqa_accuracy", min_clean_performance=0.6, required_metrics=[])
    metrics = {**GOOD, "vqa_accuracy": 0.5}
    decision = decide_promotion(metrics, policy)
    assert not decision.passed and any("vqa_accuracy = 0.5 violates >= 0.6" in r for r in decision.reasons)
    assert decide_promotion({**GOOD, "vqa_accuracy": 0.6}, policy).passed


def test_clean_drop_against_champion():
    policy = GatePolicy(max_clean_drop=0.02)
    worse = decide_promotion({**GOOD, "clean_exact_match": 0.85}, policy, {"clean_exact_match": 0.9})
    assert not worse.passed
    assert any("drop vs champion = 0.05 (0.9 -> 0.85) exceeds" in r for r in worse.reasons)
    close = decide_promotion({**GOOD, "clean_exact_match": 0.89}, policy, {"clean_exact_match": 0.9})
    drop = next(c for c in close.checks if c.name == "clean_drop_vs_champion")
    assert close.passed and drop.value == pytest.approx(0.01)
    first = decide_promotion(GOOD, policy, None)
    assert first.passed and "no version holds alias" in first.checks[-1].detail


def test_champion_without_clean_metric_fails():
    decision = decide_promotion(GOOD, GatePolicy(), {"asr": 0.0})
    assert not decision.passed
    assert any("missing from the champion metrics" in r for r in decision.reasons)


def test_decision_renders_table_and_markdown():
    decision = decide_promotion({**GOOD, "asr": 0.3}, GatePolicy())
    table = decision.table().splitlines()
    assert table[0].split() == ["check", "value", "limit", "ok"]
    assert any(line.startswith("asr") and line.endswith("FAIL") for line in table)
    markdown = decision.markdown()
    assert markdown.startswith("## Backdoor promotion gate: FAILED")
    assert "| asr | 0.3 | <= 0.05 | FAIL |" in markdown
    data = json.loads(json.dumps(decision.to_dict()))  # small and JSON-safe: fit for XCom or KFP metadata
    assert data["passed"] is False and data["checks"][0]["metric"] == "asr"


# ------------------------------------------------------------------------------------ against MLflow
@pytest.fixture
def registry(mlflow_server, tmp_path):
    """Register candidates on the real server: ``registry(metrics) -> (name, version)``."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    (model_dir / "model.safetensors").write_bytes(b"not read by the gate")
    (model_dir / "processor_config.json").write_text("{}")
    name = f"gate-{uuid.uuid4().hex[:8]}"

    def register(metrics: dict, *, nan: tuple[str, ...] = (), crash: bool = False) -> tuple[str, str]:
        try:
            with tracking.pipeline_run("gate-tests", tracking_uri=mlflow_server.uri) as run:
                tracking.log_metrics(metrics)
                for key in nan:  # what a pipeline that bypassed log_metrics's check would leave behind
                    MlflowClient(mlflow_server.uri).log_metric(run.info.run_id, key, math.nan)
                version = tracking.log_and_register_model(model_dir, name, tags={"backdoor_gate": "pending"})
                if crash:
                    raise RuntimeError("pipeline crashed after registering")
        except RuntimeError:
            assert crash
        return name, version.version

    register.name = name
    return register


@pytest.fixture
def policy_file(tmp_path) -> Path:
    return GatePolicy().save(tmp_path / "policy.json")


def gate(capsys, server_uri: str, name: str, version: str, policy: Path, *extra: str) -> tuple[int, str, str]:
    code = main([str(a) for a in ["gate", "--model-name", name, "--version", version, "--policy", policy,
                 "--tracking-uri", server_uri, *extra]])  # fmt: skip
    out, err = capsys.readouterr()
    return code, out, err


def alias_holder(uri: str, name: str, alias: str = "champion") -> str | None:
    return MlflowClient(uri, registry_uri=uri).get_registered_model(name).aliases.get(alias)


def test_passing_candidate_moves_alias_and_tags(mlflow_server, registry, policy_file, capsys, tmp_path):
    name, version = registry(GOOD)
    summary = tmp_path / "gate.md"
    code, out, _ = gate(capsys, mlflow_server.uri, name, version, policy_file, "--summary-md", summary)
    assert code == 0
    assert alias_holder(mlflow_server.uri, name) == version
    tags = MlflowClient(mlflow_server.uri).get_model_version(name, version).tags
    assert tags[VERDICT_TAG] == "passed" and tags[REASONS_TAG] == "none"
    assert "backdoor gate PASSED" in out and "alias 'champion' -> version" in out
    assert summary.read_text().startswith("## Backdoor promotion gate: PASSED")
    assert "| asr | 0.01 | <= 0.05 | ok |" in summary.read_text()


def test_missing_metric_fails_tags_and_moves_nothing(mlflow_server, registry, policy_file, capsys):
    champion_name, champion = registry(GOOD)
    assert gate(capsys, mlflow_server.uri, champion_name, champion, policy_file)[0] == 0
    name, version = registry({k: v for k, v in GOOD.items() if k != "asr"})
    assert name == champion_name
    code, out, _ = gate(capsys, mlflow_server.uri, name, version, policy_file)
    assert code == 1
    assert alias_holder(mlflow_server.uri, name) == champion
    tags = MlflowClient(mlflow_server.uri).get_model_version(name, version).tags
    assert tags[VERDICT_TAG] == "failed"
    assert "asr is missing from the candidate metrics" in tags[REASONS_TAG]
    assert "backdoor gate FAILED" in out and "not moved" in out


def test_nan_metric_fails(mlflow_server, registry, policy_file, capsys):
    name, version = registry({k: v for k, v in GOOD.items() if k != "residual_asr"}, nan=("residual_asr",))
    code, out, _ = gate(capsys, mlflow_server.uri, name, version, policy_file)
    assert code == 1
    assert "residual_asr of the candidate is nan" in out
    assert alias_holder(mlflow_server.uri, name) is None


def test_clean_drop_uses_champion_metrics(mlflow_server, registry, policy_file):
    policy = GatePolicy.from_file(policy_file)
    name, first = registry(GOOD)
    assert run_gate(name, first, policy, tracking_uri=mlflow_server.uri).promoted
    _, worse = registry({**GOOD, "clean_exact_match": 0.8})
    result = run_gate(name, worse, policy, tracking_uri=mlflow_server.uri)
    assert not result.promoted and result.champion_version == first
    assert any("(0.9 -> 0.8)" in r for r in result.decision.reasons)
    assert alias_holder(mlflow_server.uri, name) == first
    _, close = registry({**GOOD, "clean_exact_match": 0.89})
    result = run_gate(name, close, policy, tracking_uri=mlflow_server.uri)
    drop = next(c for c in result.decision.checks if c.name == "clean_drop_vs_champion")
    assert result.promoted and drop.value == pytest.approx(0.01)
    assert alias_holder(mlflow_server.uri, name) == close


def test_candidate_from_failed_run_fails(mlflow_server, registry, policy_file, capsys):
    name, version = registry(GOOD, crash=True)
    code, out, _ = gate(capsys, mlflow_server.uri, name, version, policy_file)
    assert code == 1 and "ended FAILED" in out
    assert alias_holder(mlflow_server.uri, name) is None


def test_version_chosen_by_run_id(mlflow_server, registry, policy_file, capsys):
    name, version = registry(GOOD)
    run_id = MlflowClient(mlflow_server.uri).get_model_version(name, version).run_id
    code = main(["gate", "--model-name", name, "--run-id", run_id, "--policy", str(policy_file),
                 "--tracking-uri", mlflow_server.uri])  # fmt: skip
    assert code == 0 and alias_holder(mlflow_server.uri, name) == version


def test_mlflow_down_is_an_error_quickly(mlflow_server, registry, policy_file, capsys, tmp_path):
    name, version = registry(GOOD)  # a candidate that would pass, on the server the gate cannot reach
    summary = tmp_path / "gate.md"
    uri = f"http://ci:s3cret@127.0.0.1:{free_port()}"
    start = time.monotonic()
    code, _, err = gate(capsys, uri, name, version, policy_file, "--summary-md", summary)
    elapsed = time.monotonic() - start
    assert code == 2 and f"cannot read '{name}' version {version} from MLflow at http://***@127.0.0.1" in err
    assert alias_holder(mlflow_server.uri, name) is None
    assert "s3cret" not in err + summary.read_text()
    # Not a speed target: MLflow's default retries would wait minutes; the gate must give up in seconds.
    assert elapsed < 60, elapsed
    assert summary.read_text().startswith("## Backdoor promotion gate: ERROR")


def test_malformed_policy_is_an_error_and_touches_nothing(mlflow_server, registry, capsys, tmp_path):
    name, version = registry(GOOD)
    bad = tmp_path / "policy.yaml"
    bad.write_text("max_asr: 0.05\nmax_residual_asr: lots\n")
    code, _, err = gate(capsys, mlflow_server.uri, name, version, bad)
    assert code == 2 and "max_residual_asr: expected a finite number" in err
    assert alias_holder(mlflow_server.uri, name) is None
    assert MlflowClient(mlflow_server.uri).get_model_version(name, version).tags[VERDICT_TAG] == "pending"


def test_unknown_version_is_an_error(mlflow_server, registry, policy_file, capsys):
    name, _ = registry(GOOD)
    code, _, err = gate(capsys, mlflow_server.uri, name, "99", policy_file)
    assert code == 2 and f"no version 99 of model '{name}'" in err


def test_missing_sqlite_store_is_an_error_and_not_created(policy_file, capsys, tmp_path):
    db = tmp_path / "nope" / "mlflow.db"
    code, _, err = gate(capsys, f"sqlite:///{db}", "any", "1", policy_file)
    assert code == 2 and "no MLflow database" in err
    assert not db.exists()
