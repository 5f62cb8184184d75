"""The pipeline: config validation, content-keyed step reuse, resume after a kill, bad uploads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from orchestrator_fixtures import tiny_config
from tcapguard import pipeline
from tcapguard.attacks import Attack
from tcapguard.data import DatasetError
from tcapguard.pipeline import PipelineConfig, PipelineConfigError

EXAMPLE = Path(__file__).parents[1] / "examples" / "pipeline.yaml"


def write_config(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


MINIMAL = {"model": {"source": "some/model"}, "data": {"train": "t.json", "test": "e.json"}}


# ---------------------------------------------------------------------------------------------- config


def test_the_example_config_is_valid():
    config = PipelineConfig.from_yaml(EXAMPLE)
    assert config.model.source == "llava-hf/llava-1.5-7b-hf"
    assert [a.kind for a in config.attacks] == ["badnet", "blend", "text"]
    assert config.probe.method == "lora" and config.gate.alias == "champion"


def test_round_trip_through_to_dict(tmp_path):
    config = PipelineConfig.from_yaml(EXAMPLE)
    again = PipelineConfig.from_yaml(write_config(tmp_path, config.to_dict()))
    assert again.to_dict() == config.to_dict()


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        ({"model": None}, r"missing required section\(s\) \['model'\]"),
        ({"modle": {}}, r"unknown section\(s\) \['modle'\]"),
        ({"probe": {"epochs": -1}}, r"probe: .*epochs"),
        ({"probe": {"epocs": 1}}, r"probe: unknown FinetuneConfig field\(s\) \['epocs'\]"),
        ({"gate": {"max_asr": "low"}}, r"gate: "),
        ({"filter": {"method": "magic"}}, r"filter: .*method"),
        ({"filter": {"max_posion_fraction": 0.1}}, r"filter: unknown FilterConfig field\(s\) \['max_posion"),
        (
            {"evaluation": {"batchsize": 8}},
            r"evaluation: unknown EvaluationConfig field\(s\) \['batchsize'\]",
        ),
        ({"attacks": [{"kind": "laser"}]}, r"attacks: "),
        ({"model": {"source": ""}}, r"model: source is required"),
        ({"profile": []}, r"profile: expected a mapping"),
    ],
)
def test_bad_fields_are_named(tmp_path, patch, message):
    data = {**MINIMAL, **patch}
    data = {k: v for k, v in data.items() if v is not None}
    with pytest.raises(PipelineConfigError, match=message) as info:
        PipelineConfig.from_yaml(write_config(tmp_path, data))
    assert str(tmp_path / "pipeline.yaml") in str(info.value)


def test_not_yaml_is_named(tmp_path):
    path = tmp_path / "pipeline.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(PipelineConfigError, match="not valid YAML"):
        PipelineConfig.from_yaml(path)


def test_attacks_accept_names_and_mappings():
    config = PipelineConfig.from_dict({**MINIMAL, "attacks": ["badnet", {"kind": "text", "target": "pwned"}]})
    assert config.attacks[0] == Attack.preset("badnet")
    assert config.attacks[1].kind == "text" and config.attacks[1].target == "pwned"


# ------------------------------------------------------------------------------------------ step cache


def test_selection_needs_a_validation_split_and_two_seeds():
    with pytest.raises(PipelineConfigError, match=r"config: selection: .*data\.validation"):
        PipelineConfig.from_dict({**MINIMAL, "selection": {"seeds": [0, 1]}})
    data = {**MINIMAL["data"], "validation": "v.json"}
    with pytest.raises(PipelineConfigError, match="selection: seeds: give two or more"):
        PipelineConfig.from_dict({**MINIMAL, "data": data, "selection": {"seeds": [3]}})
    with pytest.raises(PipelineConfigError, match="selection: seeds must differ"):
        PipelineConfig.from_dict({**MINIMAL, "data": data, "selection": {"seeds": [1, 1]}})


def test_a_candidate_at_the_configs_own_seed_reuses_the_lone_fine_tune(tmp_path):
    data = {}
    for split, name in (("train", "t.json"), ("test", "e.json"), ("validation", "v.json")):
        (tmp_path / name).write_text("[]")
        data[split] = str(tmp_path / name)
    lone = {**MINIMAL, "data": data, "work_dir": str(tmp_path / "runs")}
    dirs = pipeline.plan(PipelineConfig.from_dict(lone))
    selected = pipeline.plan(PipelineConfig.from_dict({**lone, "selection": {"seeds": [1, 0]}}))
    assert selected["finetune-seed0"] == dirs["finetune"] != selected["finetune-seed1"]
    assert "finetune" not in selected and "select" not in dirs
    assert selected["evaluate"] != dirs["evaluate"]  # it judges the kept model, not the lone one


def test_a_fine_tune_task_names_one_of_the_configs_seeds():
    with pytest.raises(ValueError, match=r"seed 5 is not a fine-tune of this config; its seeds: \[0\]"):
        pipeline.step_finetune(PipelineConfig.from_dict(MINIMAL), seed=5)
    data = {**MINIMAL["data"], "validation": "v.json"}
    selected = PipelineConfig.from_dict({**MINIMAL, "data": data, "selection": {"seeds": [0, 1]}})
    with pytest.raises(ValueError, match=r"one candidate seed at a time, one of \[0, 1\]"):
        pipeline.step_finetune(selected)


def test_a_finished_step_is_reused_and_an_unfinished_one_recomputed(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"value": len(calls)}

    step_dir = str(tmp_path / "step-abc")
    assert pipeline._cached(step_dir, compute) == {"value": 1}
    assert pipeline._cached(step_dir, compute) == {"value": 1}
    assert len(calls) == 1
    (tmp_path / "step-abc" / pipeline.MARKER).unlink()  # as if killed before the marker was written
    assert pipeline._cached(step_dir, compute) == {"value": 2}


# --------------------------------------------------------------------------------------- end to end


@pytest.fixture
def small_run(tmp_path, tiny_models):
    """A pipeline config on the small untrained tiny LLaVA and a 24-record upload, local MLflow."""
    settings = tiny_config(
        tmp_path,
        tiny_models.path("llava"),
        tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
        registered_model="small",
    )
    return write_config(tmp_path, {**settings, "evaluate_probe": False})


def test_a_run_killed_after_profiling_resumes_without_recomputing_it(small_run, monkeypatch):
    config = PipelineConfig.from_yaml(small_run)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed during the filter step")

    monkeypatch.setattr(pipeline, "filter_samples", killed)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(config)
    profile_dirs = list(Path(config.work_dir).glob("profile-*"))
    assert len(profile_dirs) == 1 and (profile_dirs[0] / pipeline.MARKER).exists()
    shards = {p.name: p.stat().st_mtime_ns for p in profile_dirs[0].glob("shard-*.npz")}
    assert len(shards) == 3
    monkeypatch.undo()

    def must_not_run(*args, **kwargs):
        raise AssertionError("a finished step was recomputed")

    monkeypatch.setattr(pipeline, "profile_attention", must_not_run)
    monkeypatch.setattr(pipeline, "finetune_model", _only_for(pipeline.finetune_model, "finetune-"))
    result = pipeline.run(config)
    assert {p.name: p.stat().st_mtime_ns for p in profile_dirs[0].glob("shard-*.npz")} == shards
    assert result.samples == 24 and 0 <= result.flagged <= 24
    assert result.gate["version"] == "1" and result.gate["run_id"]
    assert set(result.metrics_after) >= {"asr", "clean_exact_match", "flagged_fraction"}


@pytest.mark.slow
def test_the_model_selection_keeps_is_the_one_evaluated_and_registered(small_run, monkeypatch):
    from mlflow import MlflowClient

    from tcapguard import selection

    settings = yaml.safe_load(small_run.read_text())
    config = PipelineConfig.from_dict({**settings, "selection": {"seeds": [0, 1]}})
    kept = []

    def select_last(candidates, max_clean_drop):  # not the first, so wiring that ignores it fails
        kept.append(candidates[-1])
        return candidates[-1]

    monkeypatch.setattr(pipeline, "select", select_last)
    calls = []  # (output directory, the part of the flagged samples replayed)
    evaluate_model = pipeline.evaluate_model

    def recording(model, test, out, evaluation, **kwargs):
        calls.append((Path(out), kwargs["replay_part"]))
        return evaluate_model(model, test, out, evaluation, **kwargs)

    monkeypatch.setattr(pipeline, "evaluate_model", recording)
    result = pipeline.run(config)
    report = json.loads((Path(result.steps["select"]) / "selection.json").read_text())
    candidates = [selection.Candidate(**c) for c in report["candidates"]]
    assert [c.seed for c in candidates] == [0, 1] and candidates[0].model != candidates[1].model
    assert all(c.clean_drop is not None and c.residual_asr is not None for c in candidates)
    assert report["kept"] == kept[0].to_dict() == candidates[1].to_dict()
    assert pipeline.final_model(config, result.steps) == candidates[1].model
    assert {p.name for p in Path(result.steps["select"]).iterdir()} >= {"probe", "seed-0", "seed-1"}
    assert result.selection["selected_seed"] == 1
    assert "fine-tune kept     seed 1 of 2" in pipeline.summarize(result, config)
    version = MlflowClient(config.tracking.tracking_uri).get_model_version("small", result.gate["version"])
    assert version.tags["tcapguard.finetune_seed"] == "1"
    # the gate's replay probes are not the ones the choice was made on
    chose = {part for out, part in calls if out.parent == Path(result.steps["select"])}
    judged = [part for out, part in calls if out == Path(result.steps["evaluate"])]
    assert len(calls) == 4 and chose == {pipeline.SELECT_REPLAY} and judged == [pipeline.GATE_REPLAY]
    assert {pipeline.SELECT_REPLAY, pipeline.GATE_REPLAY} == {(0, 2), (1, 2)}


def _only_for(function, prefix: str):
    """``function`` when its output directory starts with ``prefix``; an error otherwise."""

    def guarded(base_model, train, out, config):
        if not Path(out).name.startswith(prefix):
            raise AssertionError(f"{out} was finished and must not be recomputed")
        return function(base_model, train, out, config)

    return guarded


def test_a_corrupt_image_is_reported_by_id(small_run, capsys):
    from tcapguard.cli import main

    config = PipelineConfig.from_yaml(small_run)
    records = json.loads(Path(config.data.train).read_text())
    broken = Path(config.data.train).parent / records[3]["image"]
    broken.write_bytes(b"not a png")
    code = main(["run", str(small_run)])
    err = capsys.readouterr().err
    assert code == 2
    assert records[3]["id"] in err and "image" in err
    with pytest.raises(DatasetError):
        pipeline.run(config)


def test_the_cli_lists_the_pipelines_steps():
    from tcapguard.cli import STEP_NAMES

    assert tuple(pipeline.STEP_FUNCTIONS) == STEP_NAMES


def test_the_whole_run_on_s3(small_run, s3_bucket):
    """Data read from and every step's output written to a real S3 server (Ceph RGW)."""
    from tcapguard.storage import exists, join, upload_directory

    config = PipelineConfig.from_yaml(small_run)
    data_dir = Path(config.data.train).parent
    upload_directory(data_dir, join(s3_bucket, "data"))
    data = {
        k: join(s3_bucket, "data", Path(v).name)
        for k, v in {
            "train": config.data.train,
            "test": config.data.test,
            "manifest": config.data.manifest,
        }.items()
    }
    settings = yaml.safe_load(Path(small_run).read_text())
    settings["data"].update(data)
    settings["work_dir"] = join(s3_bucket, "runs")
    config = PipelineConfig.from_dict(settings)
    result = pipeline.run(config)
    for step in ("probe-finetune", "profile", "filter", "finetune", "evaluate"):
        assert result.steps[step].startswith(s3_bucket) and exists(join(result.steps[step], pipeline.MARKER))
    assert exists(join(result.steps["evaluate"], "metrics.json"))
    assert result.gate["version"] == "1"


@pytest.fixture(scope="module")
def demo_world_runs(tmp_path_factory):
    """The demo's world (a pre-trained tiny Gemma3, BadNet at 10%) run through `tcapguard run` twice on
    the same poisoned upload: with the TCAP filter and without it (exit codes), then `pipeline.run` on
    the same configs for the figures (every step reused, the gate's verdict included). Trained 5
    epochs where the demo trains 3: on one machine the 1-thread world learned no backdoor in 3
    (probe ASR 0.000; the same code had passed on another), and these tests need a backdoor to keep
    out. About 13 minutes on 2 cores."""
    from dataclasses import replace

    from tcapguard.cli import main
    from tcapguard.demo import demo_config

    root = tmp_path_factory.mktemp("gate-e2e")
    guarded = demo_config(root / "demo", family="gemma3", cache_dir=root / "cache")
    tuning = replace(guarded.probe, epochs=5)
    guarded = replace(guarded, probe=tuning, finetune=tuning)
    unguarded = replace(guarded, filter_enabled=False)
    codes = {}
    for name, config in (("guarded", guarded), ("unguarded", unguarded)):
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        codes[name] = main(["run", str(path)])
    guarded_run, unguarded_run = pipeline.run(guarded), pipeline.run(unguarded)
    probe_asr = unguarded_run.metrics_before["asr"]
    if probe_asr < 0.5:  # a precondition of both tests, not what they test: say so instead of failing both
        pytest.fail(
            f"the gate tests' world learned no backdoor (probe ASR {probe_asr:.3f} on triggered test inputs, "
            "needs >= 0.5): nothing is left for the filter to keep out. Train the fixture's world longer."
        )
    return guarded, codes, guarded_run, unguarded_run


@pytest.mark.slow
def test_the_gate_fails_without_the_filter(demo_world_runs):
    config, codes, guarded, unguarded = demo_world_runs
    assert codes["unguarded"] == 1  # `tcapguard run` exits 1 on a failed gate
    assert not unguarded.passed
    assert unguarded.metrics_after["asr"] > config.gate.max_asr
    assert any("asr" in reason for reason in unguarded.gate["reasons"])
    assert unguarded.steps["probe-finetune"] == guarded.steps["probe-finetune"]  # reused, not retrained


@pytest.mark.slow
def test_the_gate_passes_with_the_filter(demo_world_runs):
    config, codes, guarded, _ = demo_world_runs
    assert codes["guarded"] == 0, guarded.gate["reasons"]
    assert guarded.passed
    assert guarded.metrics_after["detection_f1"] >= 0.9
    assert guarded.metrics_after["asr"] <= config.gate.max_asr
    # The flagged images' hot regions (regions.json) carry the trigger: pasted onto clean test images
    # they fire the probe's backdoor (measured 0.63 in the 1-thread 3-epoch world, 1.00 in the 2-thread demo;
    # 0.00 without the paste) and not the final model's.
    assert Path(guarded.steps["filter"], "regions.json").exists()
    assert guarded.metrics_before["residual_asr_paste"] >= 0.5
    assert guarded.metrics_before["residual_asr_paste_baseline"] == 0.0
    assert guarded.metrics_after["residual_asr_paste"] <= 0.05
