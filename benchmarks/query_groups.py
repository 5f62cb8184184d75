"""Do a group's questions tell it from the rest of the upload? Poison groups vs clean answer groups.

    .venv/bin/python benchmarks/query_groups.py            # the cached seed-0 detection worlds

The filter's one wrong group so far (LLaVA SIG 1%: 171 clean samples, most answering "three") is a
clean answer that one question type gives. A backdoor is planted on samples drawn at random, so its
questions look like everyone else's, except for a text trigger's words. This measures, per group,
the 5-fold cross-validated AUROC of a bag-of-words logistic regression on the user queries (group
vs rest), after dropping the one word whose share differs most between them (``query_auroc``: a
one-word text trigger) or every word whose share in the group exceeds its share outside by more
than 0.5 (``query_auroc_lift50``: a trigger phrase): for the poisoned samples (ground truth), for
the default filter's flags, and for every clean answer that 0.5-20% of the upload gives. A guard
on flagged groups works if poison stays near 0.5 and clean answer groups do not. Reads the worlds
and profiles that ``benchmarks/detection.py`` caches. Results go to
``benchmarks/results/query_groups.json``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from sklearn.feature_extraction.text import CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import cross_val_predict

from base_options import add_base_options, base_settings, base_spec
from tcapguard.attacks import Attack
from tcapguard.detection import TCAPFilter, _normalized_responses
from tcapguard.tinyworld import WorldSpec, build_world, default_cache_dir

CELLS = (  # (attack, rate) at seed 0, as in benchmarks/results/detection*.json
    *((a, 0.10) for a in ("badnet", "blend", "sig", "wanet", "text", "dual")),
    *((a, r) for a in ("badnet", "sig", "text") for r in (0.05, 0.01)),
)


def query_auroc(
    queries: list[str], member: np.ndarray, max_lift: float | None = None, seed: int = 0
) -> float:
    """Cross-validated AUROC of group membership from the queries' words, less the most telling word
    (``max_lift`` None) or less every word whose share in the group exceeds its share outside by
    more than ``max_lift`` (a trigger phrase of several words)."""
    words = CountVectorizer(token_pattern=r"[A-Za-z']+", binary=True)
    x = words.fit_transform(queries)
    lift = np.asarray(x[member].mean(0)).ravel() - np.asarray(x[~member].mean(0)).ravel()
    keep = np.sort(np.argsort(-lift)[1:]) if max_lift is None else np.flatnonzero(lift <= max_lift)
    x = x[:, keep]
    model = LogisticRegression(max_iter=2000, random_state=seed)
    scores = cross_val_predict(model, x, member.astype(int), cv=5, method="predict_proba")[:, 1]
    return float(roc_auc_score(member, scores))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", nargs="+", default=["llava", "gemma3"])
    add_base_options(parser)
    parser.add_argument("--out", default="benchmarks/results/query_groups.json")
    args = parser.parse_args()
    cache = default_cache_dir()
    rows = []
    for family in args.family:
        for attack, rate in CELLS:
            spec = WorldSpec(base=base_spec(family, args), attack=Attack.preset(attack), rate=rate, seed=0)
            world = build_world(spec, cache)
            train = world.load_train()
            n = len(train)
            queries = [r.query for r in train.records]
            responses = [r.response for r in train.records]
            answers = _normalized_responses(responses, n)
            poisoned = np.isin(train.ids, world.load_manifest().poisoned_ids)
            profile = world.load_profile()
            flags = TCAPFilter().fit(profile, responses=responses).labels_
            flagged = np.isin(train.ids, [i for i, f in zip(profile.ids, flags, strict=True) if f])
            groups = {"poisoned": poisoned}
            if flagged.any():
                groups["flagged"] = flagged
            for answer, count in Counter(answers[~poisoned]).items():
                if 0.005 * n <= count <= 0.20 * n:
                    groups[f"clean answer {answer!r}"] = (answers == answer) & ~poisoned
            for name, member in groups.items():
                rows.append(
                    {
                        "family": family,
                        "attack": attack,
                        "rate": rate,
                        "group": name,
                        "size": int(member.sum()),
                        "poisoned_in_group": int((member & poisoned).sum()),
                        "query_auroc": query_auroc(queries, member),
                        "query_auroc_lift50": query_auroc(queries, member, max_lift=0.5),
                    }
                )
            upload = [r for r in rows if (r["family"], r["attack"], r["rate"]) == (family, attack, rate)]
            for key in ("query_auroc", "query_auroc_lift50"):
                clean = [r[key] for r in upload if r["group"].startswith("clean")]
                print(
                    f"{family:7s} {attack:7s} {rate:.2f} {key:18s} poisoned {upload[0][key]:.3f}  "
                    + (f"flagged {upload[1][key]:.3f}  " if flagged.any() else "")
                    + f"clean answer groups {min(clean):.3f}-{max(clean):.3f} ({len(clean)})",
                    flush=True,
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "base": base_settings(args)}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
