"""The Airflow adapter: the DAG parses, and dag.test() runs the local mode end to end on a tiny setting
against a real MLflow server; a passing gate promotes, a failing one skips promotion and fails the run."""

from __future__ import annotations

import time
import uuid

import pytest

from airflow_fixtures import DAGS
from orchestrator_fixtures import FAILING, PASSING, as_yaml, tiny_config


def _dag(airflow_db):
    from airflow.models import DagBag

    bag = DagBag(dag_folder=str(DAGS))
    assert bag.import_errors == {}
    return bag.get_dag("tcapguard_backdoor_gate")


ARGUMENT_TASKS = {"profile_arguments", "finetune_arguments"}  # the mapped pods' arguments


def test_the_dag_parses_cheaply(airflow_db):
    start = time.perf_counter()
    dag = _dag(airflow_db)
    assert time.perf_counter() - start < 30  # generous on a loaded runner; about 3 s here
    assert dag.params["mode"] == "" and dag.params["num_workers"] == 2
    local = {t.task_id for t in dag.tasks if t.task_id.startswith("local.")}
    pods = {t.task_id for t in dag.tasks if t.task_id.startswith("kubernetes.")}
    assert {t.removeprefix("kubernetes.") for t in pods} - ARGUMENT_TASKS == {
        t.removeprefix("local.") for t in local
    }
    gate_pod = dag.get_task("kubernetes.gate")
    assert "tcapguard step gate" in gate_pod.arguments[0] and "[ $? -eq 1 ]" in gate_pod.arguments[0]
    assert dag.get_task("kubernetes.evaluate").container_resources.limits == {"nvidia.com/gpu": "1"}
    tuned = dag.get_task("kubernetes.finetune")  # mapped over the fine-tune seeds
    assert tuned.partial_kwargs["container_resources"].limits == {"nvidia.com/gpu": "1"}
    assert dag.get_task("kubernetes.filter").container_resources is None


def test_the_image_follows_the_package_version():
    import importlib.util

    from tcapguard import __version__

    spec = importlib.util.spec_from_file_location("dag_module", DAGS / "tcapguard_backdoor_gate.py")
    source = spec.loader.get_source("dag_module")
    assert f'IMAGE = "ghcr.io/tcapguard/tcapguard:{__version__}"' in source


def _states(dag_run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dag_run.get_task_instances()}


@pytest.mark.slow
def test_local_mode_promotes_on_pass_and_fails_closed(tmp_path, tiny_models, mlflow_server, airflow_db):
    from mlflow import MlflowClient

    dag = _dag(airflow_db)
    name = f"airflow-{uuid.uuid4().hex[:8]}"
    config = tiny_config(
        tmp_path, tiny_models.path("llava"), tracking_uri=mlflow_server.uri, registered_model=name
    )
    config["selection"] = {"seeds": [0, 1]}  # two fine-tunes, mapped like the profile workers
    run = dag.test(run_conf={"config": as_yaml(config), "policy": PASSING, "mode": "local"})
    states = _states(run)
    assert run.state == "success", states
    assert states["promote"] == "success" and states["reject"] == "skipped"
    assert states["kubernetes.probe-finetune"] == "skipped" and states["kubernetes.gate"] == "skipped"
    assert all(states[f"local.{s}"] == "success" for s in ("probe-finetune", "merge-profile", "gate"))
    mapped = [ti for ti in run.get_task_instances() if ti.task_id == "local.profile"]
    assert sorted(ti.map_index for ti in mapped) == [0, 1]
    tuned = [ti for ti in run.get_task_instances() if ti.task_id == "local.finetune"]
    assert sorted(ti.map_index for ti in tuned) == [0, 1] and states["local.select"] == "success"
    client = MlflowClient(mlflow_server.uri)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and champion.tags["tcapguard.finetune_seed"] in ("0", "1")

    # The same upload, the policy overridden by conf to one it cannot meet: promotion is skipped and
    # the run fails; the version is registered and tagged failed, the alias stays where it was.
    run = dag.test(run_conf={"config": as_yaml(config), "policy": FAILING, "mode": "local"})
    states = _states(run)
    assert run.state == "failed", states
    assert states["local.gate"] == "success" and states["verdict"] == "success"
    assert states["promote"] == "skipped" and states["reject"] == "failed"
    assert client.get_model_version(name, "2").tags["backdoor_gate"] == "failed"
    assert client.get_model_version_by_alias(name, "champion").version == "1"


def test_a_bad_config_fails_before_any_step(airflow_db):
    run = _dag(airflow_db).test(run_conf={"config": "model: {source: x}\n", "mode": "local"})
    states = _states(run)
    assert run.state == "failed"
    assert states["resolve_config"] == "failed"
    assert states["local.probe-finetune"] == "upstream_failed"
