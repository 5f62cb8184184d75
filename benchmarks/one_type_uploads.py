"""Clean uploads of one question type, one answer thinned to a minority: does the filter flag it?

    .venv/bin/python benchmarks/one_type_uploads.py               # the cached clean worlds, seed 0
    .venv/bin/python benchmarks/one_type_uploads.py --family gemma3 --seeds 0 1 --share 0.05
    .venv/bin/python benchmarks/one_type_uploads.py --qtypes count color --filters tcap+responses
    .venv/bin/python benchmarks/one_type_uploads.py --attack badnet --rate 0.1 --seeds 0  # poisoned cuts

The case the query test cannot guard. A backdoor's poison is drawn at random from the upload, so
its questions look like everyone else's; a clean answer group is usually one question type, and
``TCAPFilter(max_query_auroc=...)`` declines it on that. In an upload that is one question type
(a classification task: "Is there a defect?"), every group's questions look like everyone else's,
and a minority answer whose samples the attention sets apart (the first response token attends to
what decides the answer) looks like a backdoor with that answer as its target. Per clean world
(the uploads ``benchmarks/detection.py`` caches) and question type, the upload is cut to that type
and each answer in turn is thinned to ``--share`` of the cut (the others kept whole); the default
filter and the filter without the giver test are fitted on the cut's profile rows, responses and
queries. Nothing in these cuts is poisoned, so every flag is a false one. With ``--attack``, the
other side: the poisoned world of that attack and ``--rate`` is cut to each question type whole
(its poisoned samples of that type kept, nothing thinned), and F1 says whether the filter still
finds the backdoor in an upload of one question type. Results go to
``benchmarks/results/one_type_uploads.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import f1_score

from base_options import add_base_options, base_settings, base_spec
from tcapguard.attacks import Attack
from tcapguard.detection import TCAPFilter
from tcapguard.profiling import Profile
from tcapguard.tinyworld import WorldSpec, build_world, default_cache_dir

FILTERS = {"tcap+responses": {}, "tcap+responses/votes-only": {"giver_alpha": None}}


def thinned(
    qtypes: np.ndarray, answers: np.ndarray, qtype: str, answer: str, share: float, seed: int
) -> np.ndarray:
    """Indices of the samples of ``qtype``, with ``answer``'s givers drawn down to ``share`` of them."""
    rest = np.flatnonzero((qtypes == qtype) & (answers != answer))
    givers = np.flatnonzero((qtypes == qtype) & (answers == answer))
    k = min(givers.size, round(share * rest.size / (1 - share)))
    drawn = np.random.default_rng(seed).choice(givers, k, replace=False)
    return np.sort(np.concatenate([rest, drawn]))


def cuts(qtypes: np.ndarray, answers: np.ndarray, args: argparse.Namespace, seed: int):
    """(question type, thinned answer or None, indices) of every cut to make of an upload."""
    for qtype in sorted(set(qtypes) & set(args.qtypes or qtypes)):
        if args.attack:
            yield qtype, None, np.flatnonzero(qtypes == qtype)
            continue
        for answer in sorted(set(answers[qtypes == qtype])):
            yield qtype, answer, thinned(qtypes, answers, qtype, answer, args.share, seed)


def seed_kind(candidate: dict) -> str:
    """What seeded a ``candidates_`` row: a head column, an answer that columns confirm, or the giver test."""
    return candidate.get("seed") or ("answer" if "answer" in candidate else "head")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", nargs="+", default=["gemma3", "llava"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--share", type=float, default=0.1, help="the thinned answer's share of the cut")
    parser.add_argument("--qtypes", nargs="+", default=None, help="only these question types (default: all)")
    parser.add_argument("--filters", nargs="+", default=list(FILTERS), choices=list(FILTERS))
    parser.add_argument("--attack", default=None, help="cut this attack's poisoned worlds (nothing thinned)")
    parser.add_argument("--rate", type=float, default=0.1, help="the poisoned worlds' rate (with --attack)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_base_options(parser)
    parser.add_argument("--out", default="benchmarks/results/one_type_uploads.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cache = default_cache_dir()
    rows = []
    for family in args.family:
        for seed in args.seeds:
            attack = Attack.preset(args.attack) if args.attack else None
            spec = WorldSpec(
                base=base_spec(family, args), attack=attack, rate=args.rate if attack else 0.0, seed=seed
            )
            world = build_world(spec, cache)
            records = world.load_train().records
            profile = world.load_profile()
            if [r.id for r in records] != list(profile.ids):
                raise RuntimeError(f"{world.root}: the profile's rows are not the upload's records")
            qtypes = np.array([r.extra["qtype"] for r in records])
            answers = np.array([r.response for r in records], dtype=object)
            poisoned = np.isin([r.id for r in records], world.load_manifest().poisoned_ids)
            for qtype, answer, keep in cuts(qtypes, answers, args, seed):
                cut = Profile(
                    [profile.ids[i] for i in keep],
                    profile.shares[keep],
                    profile.vision_entropy[keep],
                    profile.meta,
                )
                row = {
                    "family": family,
                    "seed": seed,
                    "qtype": qtype,
                    "answer": answer,
                    "n": int(keep.size),
                    "n_givers": int((answers[keep] == answer).sum()),
                    "n_poisoned": int(poisoned[keep].sum()),
                }
                texts = {"responses": list(answers[keep]), "queries": [records[i].query for i in keep]}
                for name in args.filters:
                    start = time.perf_counter()
                    fitted = TCAPFilter(**FILTERS[name]).fit(cut, **texts)
                    flags = fitted.labels_.astype(bool)
                    accepted = [c for c in fitted.candidates_ if c.get("accepted")]
                    row[name] = {
                        "n_flagged": fitted.n_flagged_,
                        "flagged_answers": dict(Counter(answers[keep][flags])),
                        "f1": f1_score(poisoned[keep], flags, zero_division=1.0) if args.attack else None,
                        "accepted_seed": seed_kind(accepted[0]) if accepted else None,
                        "giver_read": accepted[0].get("giver_read", "per_giver") if accepted else None,
                        "fit_seconds": time.perf_counter() - start,
                        "decision": fitted.decision_,
                    }
                rows.append(row)
                what = (
                    f"{row['n_poisoned']:3d} poisoned"
                    if args.attack
                    else f"{answer:13s} {row['n_givers']:3d}"
                )
                print(
                    f"{family:7s} {seed} {qtype:9s} {what}/{row['n']:3d}  "
                    + "  ".join(
                        f"{name} {row[name]['n_flagged']:3d} {row[name]['flagged_answers']}"
                        + (f" F1 {row[name]['f1']:.3f}" if args.attack else "")
                        for name in args.filters
                    ),
                    flush=True,
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = (
        {"share": None, "attack": args.attack, "rate": args.rate} if args.attack else {"share": args.share}
    )
    out.write_text(json.dumps({"rows": rows, **settings, "base": base_settings(args)}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
