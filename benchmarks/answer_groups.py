"""How separable is each answer group of an upload in the attention profile? Poison vs clean answers.

    .venv/bin/python benchmarks/answer_groups.py                       # the cached detection worlds
    .venv/bin/python benchmarks/answer_groups.py --family gemma3 --attacks badnet --seeds 0

A backdoor maps its samples to one answer, so a filter could take its candidate groups from the
responses (every answer that a minority gives) and ask the attention profile to confirm them. This
measures whether the profile can: for every answer given by 0.5-20% of an upload, the AUROC of every
head-share column (all layers, heads and shares) for "gives this answer" vs the rest, and how many
columns reach 0.99 / 0.95 / 0.90. A confirmation rule works only if poison groups reach counts that
clean answer groups never do, or if a further test tells the clean ones that do apart: for every
group that >= 3 columns separate at 0.99 (the filter's answer seeds, ``TCAPFilter.answer_seed_auc``)
the row also holds the query test's figure (``query_separability``). Reads the worlds and profiles
that ``benchmarks/detection.py`` caches (building any that are missing). Results go to
``benchmarks/results/answer_groups.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy.stats import rankdata

from base_options import add_base_options, base_settings, base_spec
from detection import world_profile
from tcapguard.detection import _normalized_responses, _two_sided_auroc, query_separability, query_words
from tcapguard.tinyworld import default_cache_dir

# the uploads measured in benchmarks/results/detection*.json: (attacks, seeds), plus a clean upload per seed
DEFAULT_CELLS = (
    (("badnet", "blend", "sig", "wanet", "text"), (0,)),
    (("badnet", "text", "sig"), (1, 2)),
    (("text", "sig"), (3,)),
)


def answer_groups(
    profile, responses: list[str], queries: list[str], poisoned: list[str], low: float, high: float
) -> list[dict]:
    """One row per answer that a share in [low, high] of the upload gives."""
    n = len(responses)
    answers = _normalized_responses(responses, n)  # as the filter's response test reads them
    words = query_words(queries)
    truth = np.isin(np.asarray(profile.ids), poisoned)
    ranks = rankdata(  # ties averaged (Mann-Whitney)
        np.asarray(profile.shares, dtype=np.float64).reshape(n, -1), axis=0
    )
    rows = []
    for answer, count in zip(*np.unique(answers, return_counts=True), strict=True):
        if not low <= count / n <= high:
            continue
        group = answers == answer
        auc = _two_sided_auroc(ranks, group)
        confirmed = int((auc >= 0.99).sum()) >= 3
        rows.append(
            {
                "answer": str(answer),
                "n": int(count),
                "poisoned_share": float(truth[group].mean()),
                "best_auroc": float(auc.max()),
                **{f"columns_{int(t * 100)}": int((auc >= t).sum()) for t in (0.99, 0.95, 0.9)},
                "n_columns": int(auc.size),
                "query_auroc": query_separability(words, group) if confirmed and words is not None else None,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", nargs="+", default=["llava", "gemma3"])
    parser.add_argument("--attacks", nargs="+", default=None, help="with --seeds: this grid instead")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--rate", type=float, default=0.1)
    parser.add_argument("--min-share", type=float, default=0.005)
    parser.add_argument("--max-share", type=float, default=0.2)
    add_base_options(parser)
    parser.add_argument("--out", default="benchmarks/results/answer_groups.json")
    args = parser.parse_args()
    grid = DEFAULT_CELLS if args.attacks is None else ((tuple(args.attacks), tuple(args.seeds or (0,))),)
    cache = default_cache_dir()
    rows = []
    for family in args.family:
        for attacks, seeds in grid:
            for seed in seeds:
                for attack in (*attacks, None):
                    profile, texts, poisoned = world_profile(
                        base_spec(family, args), attack, args.rate, seed, cache
                    )
                    for row in answer_groups(
                        profile,
                        texts["responses"],
                        texts["queries"],
                        poisoned,
                        args.min_share,
                        args.max_share,
                    ):
                        rows.append({"family": family, "attack": attack or "clean", "seed": seed, **row})
    print(f"{'family':7s} {'answers':8s} {'groups':>6s} {'with >= 3 columns at 0.99':>26s}  answers")
    for family in args.family:
        for poison in (True, False):
            these = [r for r in rows if r["family"] == family and (r["poisoned_share"] > 0.5) == poison]
            passing = [r for r in these if r["columns_99"] >= 3]
            names = sorted(
                {f"{r['answer']} ({r['attack']} s{r['seed']}, query {r['query_auroc']:.2f})" for r in passing}
            )
            print(
                f"{family:7s} {'poison' if poison else 'clean':8s} {len(these):6d} {len(passing):26d}  "
                + ", ".join(names)
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows, "base": base_settings(args)}, indent=1) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
