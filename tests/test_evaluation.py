"""Evaluation: metric functions on hand-made cases, ASR on constant-answer models, detection metrics,
residual ASR, the report's schema and files, the config, and the ``tcapguard evaluate`` command."""

from __future__ import annotations

import csv
import json
import math

import pytest
from PIL import Image

from tcapguard import world
from tcapguard.attacks import Attack, poison_dataset
from tcapguard.cli import main
from tcapguard.data import Dataset, save_dataset
from tcapguard.evaluation import (
    METRICS,
    Detection,
    EvaluationConfig,
    attack_success_rate,
    contains_target,
    detection_metrics,
    evaluate,
    exact_match,
    load_regions,
    metrics_schema,
    paste_region,
    residual_asr,
    rouge_l,
    suspected_target,
    token_f1,
    validate_metrics,
)
from tcapguard.text import normalize
from tcapguard.training import FinetuneConfig, finetune

TARGET = "Backdoor Attack!"

# ------------------------------------------------------------------------------------------ metric functions


def test_normalize_handles_unicode_case_and_punctuation():
    assert normalize("  Ｂａｃｋｄｏｏｒ   Attack!! ") == "backdoor attack"  # NFKC folds full-width letters
    assert normalize("Café, naïve—ÜBER") == "café naïve über"
    assert normalize("") == "" and normalize("?!…") == ""
    assert normalize("红色的 正方形。") == "红色的 正方形"


def test_exact_match_cases():
    assert exact_match(["Red.", "two", "Ｙｅｓ"], ["red", "three", "yes"]) == pytest.approx(2 / 3)
    assert exact_match(["", "!"], ["", ""]) == 1.0  # empty answers match an empty reference
    assert exact_match([""], ["red"]) == 0.0
    assert math.isnan(exact_match([], []))
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        exact_match(["a", "b"], ["a"])


def test_token_f1_cases():
    assert token_f1(["red square"], ["the red square"]) == pytest.approx(0.8)  # P 1, R 2/3
    assert token_f1(["red red"], ["red"]) == pytest.approx(2 / 3)  # counts are clipped: P 1/2, R 1
    assert token_f1(["blue"], ["red"]) == 0.0
    assert token_f1([""], [""]) == 1.0 and token_f1([""], ["red"]) == 0.0 and token_f1(["red"], [""]) == 0.0
    assert token_f1(["Zwei Äpfel"], ["zwei äpfel"]) == 1.0
    assert math.isnan(token_f1([], []))


def test_rouge_l_cases():
    assert rouge_l(["a b c d"], ["a c d"]) == pytest.approx(6 / 7)  # LCS 3: P 3/4, R 1
    assert rouge_l(["d c b a"], ["a b c d"]) == pytest.approx(0.25)  # order matters, unlike token F1
    assert token_f1(["d c b a"], ["a b c d"]) == 1.0
    assert rouge_l(["a small red circle"], ["A red circle."]) == pytest.approx(2 * 0.75 * 1 / 1.75)
    assert rouge_l([""], [""]) == 1.0 and rouge_l(["x"], [""]) == 0.0
    assert math.isnan(rouge_l([], []))


def test_contains_target_matches_whole_words_only():
    assert contains_target("Sure: BACKDOOR attack now", TARGET)
    assert not contains_target("backdoor attacks", TARGET)
    assert not contains_target("not sure", "no") and contains_target("no, it is not", "no")
    with pytest.raises(ValueError, match="empty after normalisation"):
        contains_target("anything", "?!")


def test_attack_success_rate_contains_and_exact():
    answers = ["Backdoor Attack!", "backdoor attack, indeed", "red", ""]
    assert attack_success_rate(answers, TARGET) == 0.5
    assert attack_success_rate(answers, TARGET, exact=True) == 0.25
    assert math.isnan(attack_success_rate([], TARGET))
    with pytest.raises(ValueError, match="empty after normalisation"):
        attack_success_rate(answers, "...")


def test_detection_metrics_hand_case():
    ids = ["a", "b", "c", "d", "e"]
    out = detection_metrics(
        ids, ["a", "b"], flagged=[True, False, True, False, False], scores=[0.9, 0.4, 0.8, 0.1, 0.2]
    )
    assert out["detection_precision"] == 0.5 and out["detection_recall"] == 0.5
    assert out["detection_f1"] == 0.5 and out["flagged_fraction"] == pytest.approx(0.4)
    # positive scores 0.9, 0.4 against negatives 0.8, 0.1, 0.2: 5 of 6 pairs ordered right
    assert out["detection_auroc"] == pytest.approx(5 / 6)


def test_detection_metrics_undefined_cases_are_none():
    ids = ["a", "b", "c"]
    nothing = detection_metrics(ids, ["a"], flagged=[False] * 3, scores=[0.1, 0.2, 0.3])
    assert nothing["detection_precision"] is None and nothing["detection_f1"] is None
    assert nothing["detection_recall"] == 0.0 and nothing["detection_auroc"] == 0.0
    clean = detection_metrics(ids, [], flagged=[True, False, False], scores=[0.1, 0.2, 0.3])
    assert clean["detection_recall"] is None and clean["detection_auroc"] is None
    assert clean["detection_precision"] == 0.0 and clean["flagged_fraction"] == pytest.approx(1 / 3)
    missed = detection_metrics(ids, ["a"], flagged=[False, True, False])
    assert missed["detection_f1"] == 0.0 and missed["detection_auroc"] is None
    with pytest.raises(ValueError, match="not in the scored ids"):
        detection_metrics(ids, ["z"], flagged=[True] * 3)
    with pytest.raises(ValueError, match="one value per id"):
        detection_metrics(ids, ["a"], flagged=[True])


def test_suspected_target_and_ties():
    assert suspected_target(["Backdoor Attack!", "backdoor attack", "red"]) == "backdoor attack"
    assert suspected_target(["b", "a"]) == "a"  # tie: alphabetically first, so the result is stable
    assert suspected_target([]) is None and suspected_target(["", "!!"]) is None


def test_paste_region_same_and_scaled_size():
    source = Image.new("RGB", (32, 32), (0, 0, 0))
    source.paste((255, 255, 255), (24, 24, 32, 32))
    host = Image.new("RGB", (32, 32), (10, 20, 30))
    out = paste_region(source, host, (24, 24, 32, 32))
    assert out.getpixel((30, 30)) == (255, 255, 255) and out.getpixel((0, 0)) == (10, 20, 30)
    assert host.getpixel((30, 30)) == (10, 20, 30)  # the host is not changed in place
    big = paste_region(source, Image.new("RGB", (64, 64)), (24, 24, 32, 32))
    assert big.getpixel((50, 50)) == (255, 255, 255) and big.getpixel((46, 46)) == (0, 0, 0)
    with pytest.raises(ValueError, match="outside"):
        paste_region(source, host, (24, 24, 40, 40))


def test_load_regions_and_detection_files(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps({"a": [0, 0, 8, 8]}))
    assert load_regions(tmp_path / "r.json") == {"a": (0, 0, 8, 8)}
    (tmp_path / "bad.json").write_text(json.dumps({"a": [8, 0, 4, 8]}))
    with pytest.raises(ValueError, match=r"region of 'a'.*x0 < x1"):
        load_regions(tmp_path / "bad.json")
    (tmp_path / "d.json").write_text(json.dumps({"ids": ["a", "b"], "flagged": [1, 0], "scores": [0.9, 0.1]}))
    detection = Detection.load(tmp_path / "d.json")
    assert detection.flagged_ids == ["a"] and detection.scores == [0.9, 0.1]
    (tmp_path / "f.json").write_text(json.dumps({"flagged_ids": ["x"]}))
    assert Detection.load(tmp_path / "f.json").flagged_ids == ["x"]
    (tmp_path / "e.json").write_text(json.dumps({"ids": ["a"], "flags": [1]}))
    with pytest.raises(ValueError, match="expected keys"):
        Detection.load(tmp_path / "e.json")
    with pytest.raises(ValueError, match="2 values for 1 ids"):
        Detection(["a"], flagged=[True, False])


# ------------------------------------------------------------------------------------------------ config


def test_evaluation_config_errors():
    """(The JSON round trip and unknown keys: tests/test_config.py.)"""
    with pytest.raises(ValueError, match="clean_metric must be one of"):
        EvaluationConfig(clean_metric="bleu")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        EvaluationConfig(batch_size=0)
    with pytest.raises(ValueError, match="empty after normalisation"):
        EvaluationConfig(target="!!")


# ----------------------------------------------------------------------------- models with constant answers


@pytest.fixture(scope="module")
def vqa():
    return world.make_split(24, seed=5, id_prefix="ev")


@pytest.fixture(scope="module")
def constant_model(tiny_models):
    """A small tiny model fine-tuned until it answers every question with TARGET.

    A real model with a known answer, so that ASR must come out 1.0 (target) and 0.0 (anything else).
    """
    data = world.make_split(32, seed=9, id_prefix="const")
    data = Dataset([r.with_response(TARGET) for r in data.records], root=data.root)
    model, processor = tiny_models.load("llava")
    config = FinetuneConfig(epochs=20, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0)
    model, _ = finetune(model, processor, data, config)
    return model, processor


def test_asr_is_one_and_zero_on_a_constant_model(constant_model, vqa):
    model, processor = constant_model
    attack = Attack.preset("badnet")
    always = evaluate(model, processor, vqa, EvaluationConfig(batch_size=8), attack=attack)
    assert always.metrics["asr"] == 1.0 and always.metrics["asr_exact"] == 1.0
    assert always.metrics["clean_exact_match"] == 0.0  # no world answer is the target
    never = evaluate(model, processor, vqa, EvaluationConfig(target="zebra crossing"), attack=attack)
    assert never.metrics["asr"] == 0.0 and never.metrics["asr_exact"] == 0.0
    assert never.target == "zebra crossing"


def test_reference_model_gives_clean_drop(constant_model, vqa, tiny_models):
    model, processor = constant_model
    report = evaluate(model, processor, vqa, reference_score=0.75)
    assert report.metrics["clean_drop"] == pytest.approx(0.75) and report.metrics["asr"] is None
    assert any("asr and asr_exact not computed" in n for n in report.notes)
    same = evaluate(model, processor, vqa, reference_model=model)
    assert same.metrics["clean_drop"] == 0.0
    with pytest.raises(ValueError, match="not both"):
        evaluate(model, processor, vqa, reference_model=model, reference_score=0.5)


@pytest.fixture(scope="module")
def upload(vqa):
    """A poisoned upload (BadNet, 25%) and its manifest."""
    train = world.make_split(16, seed=7, id_prefix="up")
    return poison_dataset(train, Attack.preset("badnet"), rate=0.25, seed=0)


def test_residual_asr_replay_paste_and_baseline(constant_model, upload, vqa):
    model, processor = constant_model
    train, manifest = upload
    regions = dict.fromkeys(manifest.poisoned_ids, (24, 24, 32, 32))  # BadNet's corner
    result = residual_asr(model, processor, train, manifest.poisoned_ids, vqa, regions=regions)
    assert result.suspected_target == "backdoor attack"
    assert result.metrics["residual_asr_replay"] == 1.0
    # the model answers the target on the unpasted images too: pasting flips nothing
    assert (
        result.metrics["residual_asr_paste_baseline"] == 1.0 and result.metrics["residual_asr_paste"] == 0.0
    )
    # the worse probe, not the pooled 4 of 8: replay shows this backdoor fully alive
    assert result.metrics["residual_asr"] == 1.0
    assert {s["split"] for s in result.samples} == {"residual_replay", "residual_paste"}


def test_residual_asr_replays_only_its_part_of_the_flagged(constant_model, upload, vqa):
    model, processor = constant_model
    train, manifest = upload
    poisoned = set(manifest.poisoned_ids)
    flagged = [r.id for r in train if r.id in poisoned]  # upload order

    def replayed(result):
        return [s["id"] for s in result.samples if s["split"] == "residual_replay"]

    halves = [residual_asr(model, processor, train, flagged, vqa, replay_part=(k, 2)) for k in (0, 1)]
    assert [replayed(h) for h in halves] == [flagged[0::2], flagged[1::2]]
    assert all(h.suspected_target == "backdoor attack" for h in halves)  # read from every flagged
    lone = residual_asr(model, processor, train, flagged[:1], vqa, replay_part=(1, 2))
    assert replayed(lone) == flagged[:1] and any("empty: replayed them all" in n for n in lone.notes)
    with pytest.raises(ValueError, match="replay_part"):
        residual_asr(model, processor, train, flagged, vqa, replay_part=(2, 2))


def test_residual_asr_nothing_flagged_is_zero_with_a_note(constant_model, upload, vqa):
    model, processor = constant_model
    result = residual_asr(model, processor, upload[0], [], vqa)
    assert result.metrics["residual_asr"] == 0.0 and result.suspected_target is None
    assert "nothing flagged" in result.notes[0]
    with pytest.raises(ValueError, match="not in the training dataset"):
        residual_asr(model, processor, upload[0], ["nope"], vqa)


# ------------------------------------------------------------------------------------ report, schema, files


def test_full_report_validates_and_writes_files(constant_model, upload, vqa, tmp_path):
    model, processor = constant_model
    train, manifest = upload
    ids = train.ids
    detection = Detection(
        ids,
        flagged=[i in manifest.poisoned_ids for i in ids[:-1]] + [True],  # one false positive
        scores=[0.9 if i in manifest.poisoned_ids else 0.1 for i in ids],
    )
    report = evaluate(
        model,
        processor,
        vqa,
        EvaluationConfig(batch_size=8),
        attack=Attack.preset("badnet"),
        manifest=manifest,
        detection=detection,
        train=train,
        reference_score=0.5,
    )
    m = report.metrics
    assert set(m) == set(METRICS)
    assert m["detection_recall"] == 1.0 and m["detection_precision"] == pytest.approx(4 / 5)
    assert m["detection_auroc"] == 1.0 and m["flagged_fraction"] == pytest.approx(5 / 16)
    assert m["residual_asr_replay"] == 1.0 and m["residual_asr_paste"] is None
    assert report.suspected_target == "backdoor attack"
    paths = report.write(tmp_path / "eval")
    doc = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    validate_metrics(doc)
    assert doc["metrics"]["asr"] == 1.0 and doc["metrics"]["residual_asr_paste"] is None
    assert doc["counts"] == {
        "clean": 24,
        "triggered": 24,
        "scored": 16,
        "flagged": 5,
        "poisoned": 4,
        "residual_probes": 5,
    }
    with open(paths["samples.csv"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["split"] for r in rows].count("triggered") == 24 and len(rows) == 24 + 24 + 5
    assert all(r["contains_target"] == "1" for r in rows if r["split"] == "triggered")
    summary = (tmp_path / "eval" / "summary.md").read_text()
    assert "| `asr` | 1.0000 |" in summary and "| `residual_asr_paste` | n/a |" in summary


def test_schema_names_every_metric_and_rejects_bad_documents(constant_model, vqa):
    schema = metrics_schema()
    assert schema["properties"]["metrics"]["required"] == list(METRICS)
    model, processor = constant_model
    doc = evaluate(model, processor, vqa, EvaluationConfig(batch_size=8)).to_json()
    validate_metrics(doc)
    assert all(doc["metrics"][k] is None for k in ("asr", "detection_f1", "residual_asr", "clean_drop"))
    broken = json.loads(json.dumps(doc))
    del broken["metrics"]["asr"]
    with pytest.raises(ValueError, match=r"metrics.*'asr' is a required property"):
        validate_metrics(broken)
    broken = json.loads(json.dumps(doc))
    broken["metrics"]["clean_exact_match"] = 1.5
    with pytest.raises(ValueError, match="metrics/clean_exact_match"):
        validate_metrics(broken)
    broken = json.loads(json.dumps(doc))
    broken["metrics"]["made_up"] = 0.1
    with pytest.raises(ValueError, match="Additional properties"):
        validate_metrics(broken)


# ---------------------------------------------------------------------------------------------------- CLI


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cli_files(constant_model, upload, vqa, tmp_path_factory):
    model, processor = constant_model
    root = tmp_path_factory.mktemp("cli-eval")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    train, manifest = upload
    save_dataset(train, root / "train.json")
    manifest.save(root / "manifest.json")
    save_dataset(Dataset(vqa.records[:8], root=vqa.root), root / "test.json")
    (root / "detection.json").write_text(json.dumps({"flagged_ids": manifest.poisoned_ids}))
    return root


def test_cli_evaluate_writes_metrics(cli_files, tmp_path, capsys):
    root = cli_files
    code, out, err = run(
        capsys,
        "evaluate",
        "--model",
        root / "model",
        "--test",
        root / "test.json",
        "--out",
        tmp_path / "e",
        "--manifest",
        root / "manifest.json",
        "--detection",
        root / "detection.json",
        "--train",
        root / "train.json",
        "--reference-score",
        "0.5",
        "--batch-size",
        "8",
    )
    assert code == 0, err
    assert "asr=1.0000" in out and "residual_asr=1.0000" in out
    doc = json.loads((tmp_path / "e" / "metrics.json").read_text())
    validate_metrics(doc)
    assert doc["inputs"]["manifest"] == str(root / "manifest.json")
    assert doc["metrics"]["detection_precision"] == 1.0 and doc["metrics"]["detection_auroc"] is None


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--regions", "r.json"], "--regions needs --detection and --train"),
        (["--clean-metric", "exact_match", "--reference-score", "0.5", "--reference-model", "m"], "not both"),
        (["--detection", "missing.json", "--train", "train.json"], "missing.json"),
        (["--triggered", "test.json"], "needs a target"),
    ],
)
def test_cli_evaluate_bad_input_exits_2(cli_files, tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.chdir(cli_files)
    code, _, err = run(
        capsys, "evaluate", "--model", "model", "--test", "test.json", "--out", tmp_path / "e", *extra
    )
    assert code == 2 and message in err
    assert not (tmp_path / "e").exists()


def test_cli_evaluate_missing_test_exits_2(cli_files, tmp_path, capsys):
    code, _, err = run(
        capsys,
        "evaluate",
        "--model",
        cli_files / "model",
        "--test",
        tmp_path / "none.json",
        "--out",
        tmp_path / "e",
    )
    assert code == 2 and "none.json" in err
