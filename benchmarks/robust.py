"""Plain vs robust fine-tuning on the tiny world: clean accuracy and ASR, plus an ablation of the loss.

    .venv/bin/python benchmarks/robust.py           # LLaVA, BadNet + text, 10%, seed 0, plain vs robust
    .venv/bin/python benchmarks/robust.py --attacks badnet --variants plain robust no_gate no_hinge
    .venv/bin/python benchmarks/robust.py --family llava gemma3 --attacks badnet blend sig wanet text \\
        --rates 0.05 0.10 --seeds 0 1 2 --variants plain robust              # the issue's full grid
    .venv/bin/python benchmarks/robust.py --attacks badnet --variants robust --set margin=0.3
    .venv/bin/python benchmarks/robust.py --attacks badnet --finetune-seeds 1 2    # run-to-run spread
    .venv/bin/python benchmarks/robust.py --attacks badnet --recipe method=lora --recipe learning_rate=2e-3

(a) "plain" is the poisoned world's own fine-tune (the cached world of ``tcapguard.tinyworld``);
every other variant fine-tunes the same clean base on the same poisoned upload with the same recipe
plus ``FinetuneConfig.robust``; with ``--finetune-seeds`` other than the world's own (0), "plain"
is the same fine-tune re-run with that seed (data order, initialisation and views), and every
variant is compared with the plain row of its seed; likewise with ``--recipe`` (``FinetuneConfig``
overrides for every variant, plain included, e.g. LoRA in place of full fine-tuning); (c) "tcap"
and (d) "tcap+robust" first drop what the pipeline's default filter flags (``FilterConfig()`` on
the world's profile, given the upload's responses and queries).
Beside each model's ASR is the estimate a production gate sees without knowing the attack:
residual ASR (``tcapguard.evaluation.residual_asr``) from the default filter's flags on the upload
and the trigger regions it localises, replayed and pasted through that model (0 by definition when
the filter flags nothing). Robust and filtered models are cached by content hash next to the
worlds (``TCAPGUARD_CACHE``), so a second run only evaluates. Rows are appended to the JSON
results file as they finish (``--out``, default ``benchmarks/results/robust.json``); a row with the
same key replaces the old one.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import itertools
import json
import os
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from base_options import add_base_options, base_spec
from tcapguard.attacks import Attack, make_triggered_testset
from tcapguard.detection import FilterConfig
from tcapguard.evaluation import (
    attack_success_rate,
    generate_responses,
    residual_asr,
    sample_exact_match,
)
from tcapguard.localization import Box, flagged_attention_maps, suspected_regions
from tcapguard.models import load_model
from tcapguard.storage import publish_directory
from tcapguard.tinyworld import WorldSpec, build_world, default_cache_dir
from tcapguard.training import RobustConfig, finetune
from tcapguard.world import test_split

WORLD_FINETUNE_SEED = WorldSpec().finetune.seed  # the seed of the world's own (plain) fine-tune

SHUFFLE = {"augmentation": "shuffle", "patch_ratio": 0.5}
# Loss-term ablation: each variant is RobustConfig overrides (None = plain fine-tuning).
VARIANTS: dict[str, dict | None] = {
    "plain": None,
    "robust": {},
    "no_gate": {"gate": 0.0},  # hinge + entropy only: the regulariser without the invariance-gated CE
    "no_hinge": {"cross_view_weight": 0.0},  # gated CE + entropy
    "no_entropy": {"entropy_weight": 0.0},  # gated CE + hinge
    "gate_only": {"cross_view_weight": 0.0, "entropy_weight": 0.0},
    "shuffle": SHUFFLE,  # the views before mask 25% (the reference margin's first measurements)
    "mask+shuffle": {"augmentation": ["mask", "shuffle"], "patch_ratio": [0.25, 0.5]},  # both views
    # the defaults before the reference margin: a fixed margin, both views carrying gradient
    "fixed_margin": {**SHUFFLE, "margin_reference": "fixed", "detach_augmented": False},
    # the margin relative to the batch (with both views carrying gradient, as measured)
    "batch_margin": {**SHUFFLE, "margin_reference": "batch_median", "detach_augmented": False},
    "tcap": None,  # (c) the filter, then plain fine-tuning
    "tcap+robust": {},  # (d) the filter, then robust fine-tuning
}
FILTERED = {"tcap", "tcap+robust"}


def _value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _settings(pairs: list[str]) -> dict:
    """``KEY=VALUE`` options as a dict, each value read as JSON where it parses."""
    return {key: _value(value) for key, _, value in (pair.partition("=") for pair in pairs)}


def filter_upload(world, train) -> tuple[list[str], dict[str, Box]]:
    """What the pipeline's default filter flags in the world's upload ``train``, and the suspected
    trigger regions that the filter step localises with the probe model (the world's own fine-tune)."""
    profile = world.load_profile()
    records = train.records
    estimator = FilterConfig().fit(profile, [r.response for r in records], [r.query for r in records])
    flagged = [i for i, flag in zip(profile.ids, estimator.labels_, strict=True) if flag]
    model, processor = load_model(world.model)
    maps = flagged_attention_maps(estimator, model, processor, train, flagged)
    return flagged, suspected_regions(train, maps)


def robust_model(
    spec: WorldSpec, world, robust: RobustConfig | None, cache: Path, drop: list[str] | None = None
) -> tuple[Path, float]:
    """The base fine-tuned on the world's poisoned upload, less ``drop``, with ``robust`` (None:
    plain); cached by content hash."""
    config = replace(spec.finetune, robust=robust, num_threads=None)
    identity = {"world": str(world.root.name), "finetune": asdict(config)}
    if drop is not None:  # (models cached before filtered variants existed keep their key)
        identity["drop"] = sorted(drop)
    if robust is not None and robust.margin_reference == "fixed":  # likewise, for a later field
        identity["finetune"]["robust"].pop("margin_reference")
    blob = json.dumps(identity, sort_keys=True)
    final = cache / f"robust-{world.root.name}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    if not (final / "config.json").exists():
        model, processor = load_model(world.base)

        def build(tmp: Path) -> None:
            finetune(model, processor, world.load_train().subset(drop or [], exclude=True), config, tmp)

        publish_directory(final, build)
    return final, finetune_seconds(final)


def finetune_seconds(model_dir: Path) -> float:
    """How long the fine-tune that saved ``model_dir`` took, from its ``tcapguard_finetune.json``."""
    return json.loads((model_dir / "tcapguard_finetune.json").read_text())["seconds"]


def evaluate(
    model_dir: Path,
    clean_test,
    test,
    triggered,
    target: str,
    train,
    flagged: list[str],
    regions: dict[str, Box],
) -> dict[str, float | None]:
    """Clean accuracy on ``clean_test`` and ASR on ``triggered``, and beside the ASR the
    trigger-agnostic estimate a gate would see: residual ASR from the default filter's flags on the
    upload (0 by definition when it flags none), pasted onto the world's ``test`` images."""
    model, processor = load_model(model_dir)
    answers = generate_responses(model, processor, clean_test)
    correct = "".join(
        str(int(sample_exact_match(a, r.response))) for a, r in zip(answers, clean_test, strict=True)
    )
    asr = attack_success_rate(generate_responses(model, processor, triggered), target)
    residual = residual_asr(
        model,
        processor,
        train,
        flagged,
        test,
        regions=regions,
        clean_responses={r.id: a for r, a in zip(clean_test, answers, strict=True)},
    ).metrics
    return {
        "clean_exact_match": correct.count("1") / len(correct),
        "clean_correct": correct,  # per test question, for the paired standard error of a clean drop
        "asr": asr,
        **{k: residual[k] for k in ("residual_asr", "residual_asr_replay", "residual_asr_paste")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", nargs="+", default=["llava"], choices=("llava", "gemma3"))
    parser.add_argument("--attacks", nargs="+", default=["badnet", "text"])
    parser.add_argument("--rates", nargs="+", type=float, default=[0.10])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--variants", nargs="+", default=["plain", "robust"], choices=sorted(VARIANTS))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="RobustConfig override applied to every robust variant (repeatable)",
    )
    parser.add_argument(
        "--finetune-seeds",
        nargs="+",
        type=int,
        default=[WORLD_FINETUNE_SEED],
        help="FinetuneConfig.seed of every variant, plain included (default: the world's own); the "
        "world (upload, poison) stays that of --seeds",
    )
    parser.add_argument(
        "--recipe",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="FinetuneConfig override applied to every variant, plain included (repeatable; e.g. "
        "method=lora): plain is then re-run, not the world's own fine-tune",
    )
    parser.add_argument("--tag", default="", help="suffix for the variant names in the table (with --set)")
    add_base_options(parser)
    parser.add_argument(
        "--n-test",
        type=int,
        default=None,
        help="clean questions for clean accuracy (default: the world's 300; more extend them, for a "
        "smaller standard error of a clean drop)",
    )
    parser.add_argument("--out", default="benchmarks/results/robust.json")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    overrides = _settings(args.set)
    recipe_overrides = _settings(args.recipe)
    cache = default_cache_dir()
    out = Path(args.out)
    rows = json.loads(out.read_text())["rows"] if out.exists() else []
    for family in args.family:
        base = base_spec(family, args)
        for kind in args.attacks:
            for rate in args.rates:
                for seed in args.seeds:
                    attack = Attack.preset(kind)
                    spec = WorldSpec(base=base, attack=attack, rate=rate, seed=seed)
                    world = build_world(spec, cache)
                    test = world.load_test()
                    triggered = make_triggered_testset(test, attack)
                    clean_test = test if args.n_test is None else test_split(args.n_test, seed=seed)
                    train = world.load_train()
                    flagged, regions = filter_upload(world, train)
                    for finetune_seed, variant in itertools.product(args.finetune_seeds, args.variants):
                        start = time.perf_counter()
                        drop = flagged if variant in FILTERED else None
                        settings = VARIANTS[variant]
                        robust = None if settings is None else RobustConfig(**{**settings, **overrides})
                        recipe = replace(spec.finetune, **recipe_overrides, seed=finetune_seed)
                        own = drop is None and robust is None and recipe == spec.finetune
                        if own:  # (a): the world's own fine-tune
                            model_dir = world.model
                            seconds = finetune_seconds(model_dir)
                        else:
                            seeded = replace(spec, finetune=recipe)
                            model_dir, seconds = robust_model(seeded, world, robust, cache, drop)
                        metrics = evaluate(
                            model_dir, clean_test, test, triggered, attack.target, train, flagged, regions
                        )
                        name = variant + (args.tag if robust is not None else "")
                        row = {
                            "family": family,
                            "attack": kind,
                            "rate": rate,
                            "seed": seed,
                            "finetune_seed": finetune_seed,
                            **({"recipe": recipe_overrides} if recipe_overrides else {}),
                            "variant": name,
                            "robust": asdict(robust) if robust else None,
                            "n_dropped": len(drop) if drop is not None else None,
                            "n_clean_questions": len(clean_test),
                            **metrics,
                            "finetune_seconds": seconds,
                            "wall_seconds": time.perf_counter() - start,
                        }
                        rows = store_row(out, row, args.threads)
                        print(
                            f"{family} {kind} {rate:.2f} seed={seed} finetune_seed={finetune_seed} "
                            f"{variant_label(row):14s} "
                            f"clean={metrics['clean_exact_match']:.3f} asr={metrics['asr']:.3f} "
                            f"residual={metrics['residual_asr']:.3f} "
                            f"finetune={seconds:.0f}s",
                            flush=True,
                        )
    print_table(rows)


def _recipe(row: dict) -> str:
    """The row's ``--recipe`` overrides as text ("" for the world's own recipe)."""
    return ",".join(f"{k}={v}" for k, v in sorted(row.get("recipe", {}).items()))


def variant_label(row: dict) -> str:
    """The row's variant, after its recipe where it has one (as the tables name it)."""
    return " ".join(filter(None, (_recipe(row), row["variant"])))


def _world_key(row: dict) -> tuple:
    """The upload, fine-tune seed and recipe a row was measured on (rows from before
    ``--finetune-seeds`` have the world's own seed)."""
    seed = row.get("finetune_seed", WORLD_FINETUNE_SEED)
    return row["family"], row["attack"], row["rate"], row["seed"], _recipe(row), seed


def _row_key(row: dict) -> tuple:
    return *_world_key(row), row["variant"]


def store_row(out: Path, row: dict, threads: int) -> list[dict]:
    """Add ``row`` to the results file, replacing one with the same key. The file is re-read under a
    lock (on its folder), so that runs writing the same file at once keep each other's rows."""
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = os.open(out.parent, os.O_RDONLY)
    try:
        fcntl.flock(folder, fcntl.LOCK_EX)
        rows = json.loads(out.read_text())["rows"] if out.exists() else []
        rows = [r for r in rows if _row_key(r) != _row_key(row)] + [row]
        out.write_text(json.dumps({"rows": rows, "torch_threads": threads}, indent=1))
    finally:
        os.close(folder)  # releases the lock
    return rows


def asr_cut(plain: dict, row: dict) -> float | None:
    """The share of ``plain``'s attack success that ``row`` removed (None when plain has none)."""
    return 1 - row["asr"] / plain["asr"] if plain["asr"] > 0 else None


def clean_drop_points(plain: dict, row: dict) -> tuple[float, float | None]:
    """Clean accuracy lost against ``plain`` in points, and the standard error of the paired
    per-question difference where both rows kept which questions they answered right (on the
    questions both answered: a longer clean split extends a shorter one; else None)."""
    if "clean_correct" not in plain or "clean_correct" not in row:
        return 100 * (plain["clean_exact_match"] - row["clean_exact_match"]), None
    diff = [int(a) - int(b) for a, b in zip(plain["clean_correct"], row["clean_correct"], strict=False)]
    return 100 * statistics.mean(diff), 100 * statistics.stdev(diff) / len(diff) ** 0.5


def clean_drop(plain: dict, row: dict) -> str:
    drop, se = clean_drop_points(plain, row)
    return f"{drop:+.1f}" if se is None else f"{drop:+.1f} ± {se:.1f}"


def print_table(rows: list[dict]) -> None:
    """Markdown table; ASR cut and clean drop are relative to the plain row of the same world and
    fine-tune seed."""
    plain = {_world_key(r): r for r in rows if r["variant"] == "plain"}
    print(
        "\n| family | attack | rate | seed | fine-tune seed | variant | clean acc | ASR | residual ASR "
        "| ASR cut vs plain | clean drop (pts) | fine-tune s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        key = _world_key(r)
        ref = plain.get(key)
        cut = drop = "-"
        if ref is not None and r["variant"] != "plain":
            share = asr_cut(ref, r)
            cut = "-" if share is None else f"{share:.0%}"
            drop = clean_drop(ref, r)
        residual = "-" if r.get("residual_asr") is None else f"{r['residual_asr']:.3f}"
        print(
            f"| {r['family']} | {r['attack']} | {r['rate']:.2f} | {r['seed']} | {key[-1]} | "
            f"{variant_label(r)} | "
            f"{r['clean_exact_match']:.3f} | {r['asr']:.3f} | {residual} | {cut} | {drop} | "
            f"{r['finetune_seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
