"""tcapguard.orchestration (what the adapters call) and the adapters' step lists: the compiled Kubeflow
pipeline and the Airflow DAG run exactly tcapguard.pipeline.STEP_FUNCTIONS, in that order."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from tcapguard.gate import PolicyError
from tcapguard.orchestration import load_config, run_step, to_yaml
from tcapguard.pipeline import STEP_FUNCTIONS, PipelineConfigError

ROOT = Path(__file__).parents[1]
MINIMAL = {"model": {"source": "some/model"}, "data": {"train": "t.json", "test": "e.json"}}


def _check_steps(waits: dict[str, set[str]]) -> None:
    """The adapter runs exactly the library's steps, none before a step it needs: each waits only for
    steps earlier in STEP_FUNCTIONS, each but the first waits for one, and the gate waits for all."""
    order = list(STEP_FUNCTIONS)
    assert set(waits) == set(order)
    for i, name in enumerate(order):
        assert waits[name] <= set(order[:i]), f"{name} waits for {waits[name] - set(order[:i])}"
        assert i == 0 or waits[name], f"{name} waits for nothing"
    closure = set(waits["gate"])
    while more := set().union(*(waits[n] for n in closure)) - closure:
        closure |= more
    assert closure == set(order[:-1])


def _kfp_dependencies(spec: dict) -> dict[str, set[str]]:
    """Display name -> display names it waits for, with ParallelFor/If sub-DAGs flattened: a task in
    a sub-DAG waits for what the sub-DAG's task waits for, and waiting for a sub-DAG means waiting
    for every task in it."""
    dags = {"root": spec["root"]["dag"]["tasks"]}
    dags.update({name: c["dag"]["tasks"] for name, c in spec["components"].items() if "dag" in c})
    parent, leaves, deps = {}, {}, {}
    for dag_name, tasks in dags.items():
        for key, task in tasks.items():
            ref = task["componentRef"]["name"]
            parent.setdefault((dag_name, key), None)
            deps[(dag_name, key)] = {(dag_name, d) for d in task.get("dependentTasks", [])}
            if ref in dags:
                for inner in dags[ref]:
                    parent[(ref, inner)] = (dag_name, key)

    def expand(node):
        ref = dags[node[0]][node[1]]["componentRef"]["name"]
        return set().union(*(expand((ref, k)) for k in dags[ref])) if ref in dags else {node}

    def waits_for(node):
        direct = set().union(set(), *(expand(d) for d in deps[node]))
        return direct | (waits_for(parent[node]) if parent.get(node) else set())

    for node in deps:
        if dags[node[0]][node[1]]["componentRef"]["name"] not in dags:
            leaves[node] = {dags[d[0]][d[1]]["taskInfo"]["name"] for d in waits_for(node)}
    return {dags[n[0]][n[1]]["taskInfo"]["name"]: waits for n, waits in leaves.items()}


def test_the_kfp_pipeline_runs_the_library_steps_in_order():
    sys.path.insert(0, str(ROOT))
    from pipelines.tcapguard_pipeline import COMPILED, FANOUT_AND_VERDICT_TASKS

    graph = _kfp_dependencies(next(yaml.safe_load_all(COMPILED.read_text())))
    assert set(graph) - set(STEP_FUNCTIONS) == set(FANOUT_AND_VERDICT_TASKS)
    _check_steps(
        {name: waits & set(STEP_FUNCTIONS) for name, waits in graph.items() if name in STEP_FUNCTIONS}
    )
    assert graph["promote"] == graph["reject"] == {"gate"}  # the If/Else branches on the verdict


def test_the_dag_runs_the_library_steps_in_order(airflow_db):
    from airflow.models import DagBag

    dag = DagBag(dag_folder=str(ROOT / "dags")).get_dag("tcapguard_backdoor_gate")
    for group in ("local", "kubernetes"):
        tasks = {t.task_id: t for t in dag.tasks if t.task_id.startswith(f"{group}.")}
        names = {tid: tid.removeprefix(f"{group}.") for tid in tasks}
        steps = {tid: n for tid, n in names.items() if not n.endswith("_arguments")}
        _check_steps(
            {n: {names[u] for u in tasks[tid].upstream_task_ids if u in steps} for tid, n in steps.items()}
        )


def test_only_the_fine_tune_takes_a_seed():
    with pytest.raises(ValueError, match="only the fine-tune step takes a seed, not 'gate'"):
        run_step(yaml.safe_dump(MINIMAL), "gate", seed=1)


# ------------------------------------------------------------------------------------------ load_config


def test_a_document_and_a_path_give_the_same_config(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(MINIMAL))
    assert load_config(str(path)).to_dict() == load_config(yaml.safe_dump(MINIMAL)).to_dict()
    assert load_config(to_yaml(load_config(str(path)))).to_dict() == load_config(str(path)).to_dict()


def test_overrides_apply_and_blank_ones_change_nothing(tmp_path):
    text = yaml.safe_dump(MINIMAL)
    assert load_config(text, model="", train="", test="", policy={}, work_dir="").to_dict() == (
        load_config(text).to_dict()
    )
    config = load_config(text, model="other/model", train="u.json", work_dir="/w", policy={"max_asr": 0.2})
    assert (config.model.source, config.data.train, config.data.test) == ("other/model", "u.json", "e.json")
    assert config.work_dir == "/w" and config.gate.max_asr == 0.2 and config.gate.max_residual_asr == 0.05
    policy = tmp_path / "policy.yaml"
    policy.write_text(yaml.safe_dump({"max_asr": 0.01, "required_metrics": ["asr"]}))
    assert load_config(text, policy=str(policy)).gate.max_asr == 0.01


@pytest.mark.parametrize(
    ("spec", "kwargs", "error", "message"),
    [
        ("", {}, PipelineConfigError, "got nothing"),
        ("[1, 2]", {}, PipelineConfigError, "expected a mapping of sections or a path"),
        ("model: [unclosed", {}, PipelineConfigError, "not valid YAML"),
        (yaml.safe_dump(MINIMAL), {"policy": {"max_asr": "low"}}, PipelineConfigError, "gate: "),
        (yaml.safe_dump(MINIMAL), {"policy": {"max_asr": "low"}}, PipelineConfigError, "max_asr"),
        (yaml.safe_dump(MINIMAL), {"policy": 3}, PipelineConfigError, "policy: expected"),
        (yaml.safe_dump(MINIMAL), {"policy": "/no/such/policy.yaml"}, (PolicyError, OSError), "policy"),
    ],
)
def test_bad_input_is_named(spec, kwargs, error, message):
    with pytest.raises(error, match=message):
        load_config(spec, **kwargs)


@pytest.mark.parametrize(
    ("step", "switch"),
    [("evaluate-probe", {"evaluate_probe": False}), ("profile", {"filter_enabled": False})],
)
def test_the_cli_skips_a_switched_off_step_like_every_task(tmp_path, capsys, step, switch):
    """`tcapguard step` (what the Kubernetes pods run) dispatches through run_step, as the local
    Airflow tasks and the Kubeflow components do: a step the config switches off does not run."""
    import json

    from tcapguard.cli import main

    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "work_dir": str(tmp_path / "runs"), **switch}))
    assert main(["step", step, str(path), "--outputs-json", str(tmp_path / "out.json")]) == 0
    assert json.loads((tmp_path / "out.json").read_text()) == {"skipped": True, "step": step}
    assert not (tmp_path / "runs").exists()
