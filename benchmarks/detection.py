"""Detection sweep: TCAP and BYE precision / recall / F1 / AUROC per family, attack, poison rate and seed.

    .venv/bin/python benchmarks/detection.py                                  # what is cached, plus clean
    .venv/bin/python benchmarks/detection.py --family llava gemma3 --attacks badnet text \\
        --rates 0.01 0.05 0.1 --seeds 0 1 2                                    # the issue's full grid
    .venv/bin/python benchmarks/detection.py --cells llava:badnet:0.1:0 gemma3:clean:0:1  # cells

Each cell is a tiny world (``tcapguard.tinyworld``: the clean base fine-tuned on the poisoned
upload, the TCAP protocol's first step), its attention profile and five filters: TCAP on the profile
alone, TCAP given the upload's responses and queries (the pipeline's default: the flagged samples
must share one response that the rest of the upload does not give, and their questions must not set
them apart; all three shares of every head; the linear share, then its log-ratio, then groups seeded
by the answers), the same on the
linear share only, the paper's reading of TCAP (top 4 heads of the last 2 layers, target = every
mixture component but the largest) and BYE. No
parameter is tuned per cell. Worlds and profiles are cached (``TCAPGUARD_CACHE``), so a second sweep
only fits the filters; a world not yet built costs ~2.5 min of fine-tuning on 2 idle cores. Rate 0
is the clean upload, where the right answer is "nothing flagged". ``--clean-givers K`` makes K clean
samples of each poisoned upload answer the attacker's target (in the worlds only poison does), the
case where the filter must tell poison from a clean sample that gives the same answer. Results go to
``benchmarks/results/detection.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from base_options import add_base_options, base_settings, base_spec
from tcapguard.attacks import Attack
from tcapguard.detection import BYEFilter, TCAPFilter
from tcapguard.evaluation import detection_metrics
from tcapguard.tinyworld import BaseSpec, WorldSpec, build_world, default_cache_dir

ATTACKS = ("badnet", "blend", "sig", "wanet", "ftrojan", "text", "dual")
FILTERS = {  # name -> (a fresh filter with its defaults, whether fit gets responses and queries); no tuning
    "tcap": (TCAPFilter, False),
    "tcap+responses": (TCAPFilter, True),
    "tcap-paper": (
        lambda: TCAPFilter(n_heads=4, n_layers=2, split_rule="paper", head_selection="top"),
        False,
    ),
    "bye": (BYEFilter, False),
    # the default on the linear share only (the default before scale="auto"; README, "The filter")
    "tcap+responses/linear": (lambda: TCAPFilter(scale="linear"), True),
}
# opt-in (--filters), for held-out comparisons (docs/measured/detection.md): the default before
# answer seeds, the 0.8 exclusivity bar and restrict_to_target; the default with the votes'
# posterior as it is (before restrict_to_target); the default with the votes alone deciding among
# the target's givers (before the giver test)
CANDIDATES = {
    "tcap+responses/heads-excl0.9": (
        lambda: TCAPFilter(min_response_exclusivity=0.9, answer_seed_auc=None, restrict_to_target=False),
        True,
    ),
    "tcap+responses/as-voted": (lambda: TCAPFilter(restrict_to_target=False), True),
    "tcap+responses/votes-only": (lambda: TCAPFilter(giver_alpha=None), True),
    "tcap+responses/per-giver": (lambda: TCAPFilter(giver_error="per_giver"), True),
}
ALL_FILTERS = {**FILTERS, **CANDIDATES}


def world_profile(
    base: BaseSpec, attack: str | None, rate: float, seed: int, cache: Path, n_train: int = WorldSpec.n_train
):
    """The world's profile (cached beside it), the upload's texts (``fit``'s ``responses`` and
    ``queries``) and the true poisoned ids."""
    spec = WorldSpec(
        base=base,
        attack=Attack.preset(attack) if attack else None,
        rate=rate if attack else 0.0,
        n_train=n_train,
        seed=seed,
    )
    world = build_world(spec, cache)
    records = world.load_train().records
    texts = {"responses": [r.response for r in records], "queries": [r.query for r in records]}
    return world.load_profile(), texts, world.load_manifest().poisoned_ids


def best_column_auroc(profile, poisoned: list[str]) -> float | None:
    """How well the single best head-share column separates the poison (two-sided AUROC): the
    attention anomaly every filter needs, whatever its split rule."""
    truth = np.isin(np.asarray(profile.ids), poisoned)
    if truth.all() or not truth.any():
        return None
    columns = profile.shares.reshape(len(truth), -1)
    aucs = np.array([roc_auc_score(truth, column) for column in columns.T])
    return float(np.max(np.maximum(aucs, 1 - aucs)))


def score(estimator, profile, poisoned: list[str], texts: dict[str, list[str]] | None = None) -> dict:
    start = time.perf_counter()
    estimator.fit(profile, **(texts or {}))
    seconds = time.perf_counter() - start
    metrics = detection_metrics(profile.ids, poisoned, flagged=estimator.labels_, scores=estimator.scores_)
    return {
        "n_flagged": int(np.sum(estimator.labels_)),
        "precision": metrics["detection_precision"],
        "recall": metrics["detection_recall"],
        "f1": metrics["detection_f1"],
        "auroc": metrics["detection_auroc"],
        "fit_seconds": seconds,
        "decision": getattr(estimator, "decision_", None),
    }


def with_clean_givers(texts: dict[str, list[str]], ids, poisoned: list[str], k: int, seed: int) -> dict:
    """``texts`` with ``k`` clean samples (seeded) answering the attacker's target: clean samples
    whose true answer happens to be the target, which the filter must leave alone. Their attention
    is untouched, so they are exchangeable with the other clean samples (a real clean giver has a
    reason to give that answer, which its attention may show)."""
    member = np.isin(np.asarray(ids), poisoned)
    responses = np.array(texts["responses"], dtype=object)
    target = Counter(responses[member]).most_common(1)[0][0]
    clean = np.flatnonzero(~member)
    picked = np.random.default_rng(seed).choice(clean, size=min(k, clean.size), replace=False)
    responses[picked] = target
    return {**texts, "responses": responses.tolist()}


def fmt(value) -> str:
    return "  n/a" if value is None else f"{value:5.2f}"


def parse_cell(text: str) -> tuple[str, str | None, float, int]:
    """A cell: "llava:badnet:0.1:0" -> ("llava", "badnet", 0.1, 0); "llava:clean:0:3" is a clean upload."""
    try:
        family, attack, rate, seed = text.split(":")
        if attack != "clean" and attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}")
        return (
            family,
            None if attack == "clean" else attack,
            0.0 if attack == "clean" else float(rate),
            int(seed),
        )
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"a cell is FAMILY:ATTACK:RATE:SEED, got {text!r} ({err})") from None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", nargs="+", default=["llava", "gemma3"])
    parser.add_argument(
        "--attacks", nargs="+", default=["badnet", "blend", "sig", "wanet", "text"], choices=ATTACKS
    )
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--no-clean", action="store_true", help="skip the clean upload (rate 0)")
    parser.add_argument(
        "--cells",
        nargs="+",
        type=parse_cell,
        default=None,
        metavar="FAMILY:ATTACK:RATE:SEED",
        help="these cells instead of the grid (ATTACK 'clean' for a clean upload; rate then ignored)",
    )
    parser.add_argument("--filters", nargs="+", default=list(FILTERS), choices=list(ALL_FILTERS))
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--n-train", type=int, default=WorldSpec.n_train, help="samples in the upload")
    parser.add_argument(
        "--clean-givers",
        type=int,
        default=0,
        help="this many clean samples of each poisoned upload answer the attacker's target",
    )
    add_base_options(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/results/detection.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache_dir or default_cache_dir())
    cells = [(f, a, r, s) for f in args.family for a in args.attacks for r in args.rates for s in args.seeds]
    if not args.no_clean:
        cells += [(f, None, 0.0, s) for f in args.family for s in args.seeds]
    if args.cells:
        cells = args.cells
    rows = []
    print(
        f"{'family':7s} {'attack':8s} {'rate':>5s} {'seed':>4s} | "
        + " | ".join(f"{name:>10s}: F1 AUROC flagged" for name in args.filters)
    )
    for family, attack, rate, seed in cells:
        profile, texts, poisoned = world_profile(
            base_spec(family, args), attack, rate, seed, cache, n_train=args.n_train
        )
        if args.clean_givers and poisoned:
            texts = with_clean_givers(texts, profile.ids, poisoned, args.clean_givers, seed)
        row = {
            "family": family,
            "attack": attack or "clean",
            "rate": rate,
            "seed": seed,
            "n_samples": len(profile),
            "n_poisoned": len(poisoned),
            "best_column_auroc": best_column_auroc(profile, poisoned),
            "base": base_settings(args),
            "clean_givers": args.clean_givers if poisoned else 0,
        }
        row.update(
            {
                name: score(make(), profile, poisoned, texts if with_responses else None)
                for name, (make, with_responses) in ALL_FILTERS.items()
                if name in args.filters
            }
        )
        rows.append(row)
        cells_text = [
            f"{'':>10s}  {fmt(row[n]['f1'])} {fmt(row[n]['auroc'])} {row[n]['n_flagged']:7d}"
            for n in args.filters
        ]
        print(
            f"{family:7s} {attack or 'clean':8s} {rate:5.2f} {seed:4d} | " + " | ".join(cells_text),
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1, default=str) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
