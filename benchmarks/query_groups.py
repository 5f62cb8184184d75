"""Do a group's questions tell it from the rest of the upload? Poison groups vs clean answer groups.

    .venv/bin/python benchmarks/query_groups.py            # the cached seed-0 detection worlds

The measure behind ``TCAPFilter(max_query_auroc=...)``: ``detection.query_separability``, the
5-fold cross-validated AUROC of a bag-of-words logistic regression on the user queries (group vs
rest), after leaving out every word in at least 80% of the group's queries (a text trigger, a word
or a sentence, sits in all of them). A backdoor is planted on samples drawn at random, so its
questions look like everyone else's; a clean answer (in these worlds) is given by one question
type. Per upload it reads the poisoned samples (ground truth), the filter's flags with and without
the query test, and every clean answer that 0.5-20% of the upload gives; on one upload it also
plants trigger phrases of common words (``PHRASES``) in random samples' queries. The guard works if
poison stays near 0.5 and clean answer groups do not. Reads the worlds and profiles that
``benchmarks/detection.py`` caches. Results go to ``benchmarks/results/query_groups.json``.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np

from base_options import add_base_options, base_settings, base_spec
from tcapguard.attacks import Attack, text_trigger
from tcapguard.detection import TCAPFilter, _normalized_responses, query_separability, query_words
from tcapguard.tinyworld import WorldSpec, build_world, default_cache_dir

CELLS = (  # (attack, rate) at seed 0, as in benchmarks/results/detection*.json
    *((a, 0.10) for a in ("badnet", "blend", "sig", "wanet", "text", "dual")),
    *((a, r) for a in ("badnet", "sig", "text") for r in (0.05, 0.01)),
)
PHRASES = ("cf", "what is the answer", "please tell me the answer now", "is the", "Be concise.")


def planted_phrases(queries: list[str], seed: int = 0) -> list[dict]:
    """``query_separability`` of random groups (10% and 1%) whose queries get a phrase inserted."""
    rng = np.random.default_rng(seed)
    n, rows = len(queries), []
    for phrase in PHRASES:
        for position in ("prefix", "random"):
            for rate in (0.1, 0.01):
                member = np.zeros(n, dtype=bool)
                member[rng.choice(n, int(rate * n), replace=False)] = True
                planted = [
                    text_trigger(q, trigger=phrase, position=position) if m else q
                    for q, m in zip(queries, member, strict=True)
                ]
                auroc = query_separability(query_words(planted), member)
                rows.append({"phrase": phrase, "position": position, "rate": rate, "query_auroc": auroc})
                print(f"planted {phrase!r:34s} {position:6s} {rate:.2f}  {auroc:.3f}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", nargs="+", default=["llava", "gemma3"])
    add_base_options(parser)
    parser.add_argument("--out", default="benchmarks/results/query_groups.json")
    args = parser.parse_args()
    cache = default_cache_dir()
    rows, planted = [], []
    for family in args.family:
        for attack, rate in CELLS:
            spec = WorldSpec(base=base_spec(family, args), attack=Attack.preset(attack), rate=rate, seed=0)
            world = build_world(spec, cache)
            train = world.load_train()
            n = len(train)
            queries = [r.query for r in train.records]
            responses = [r.response for r in train.records]
            if not planted:
                planted = planted_phrases(queries)
            words = query_words(queries)
            answers = _normalized_responses(responses, n)
            poisoned = np.isin(train.ids, world.load_manifest().poisoned_ids)
            profile = world.load_profile()
            groups = {"poisoned": poisoned}
            for name, max_query_auroc in (("flagged", 0.75), ("flagged without query test", None)):
                flags = TCAPFilter(max_query_auroc=max_query_auroc).fit(profile, responses, queries).labels_
                flagged = np.isin(train.ids, [i for i, f in zip(profile.ids, flags, strict=True) if f])
                if flagged.any():
                    groups[name] = flagged
            for answer, count in Counter(answers[~poisoned]).items():
                if 0.005 * n <= count <= 0.20 * n:
                    groups[f"clean answer {answer!r}"] = (answers == answer) & ~poisoned
            upload = []
            for name, member in groups.items():
                upload.append(
                    {
                        "family": family,
                        "attack": attack,
                        "rate": rate,
                        "group": name,
                        "size": int(member.sum()),
                        "poisoned_in_group": int((member & poisoned).sum()),
                        "query_auroc": query_separability(words, member),
                    }
                )
            rows += upload
            clean = [r["query_auroc"] for r in upload if r["group"].startswith("clean")]
            flagged_text = "  ".join(
                f"{r['group']} {r['query_auroc']:.3f} ({r['size']})"
                for r in upload
                if r["group"].startswith("flag")
            )
            print(
                f"{family:7s} {attack:7s} {rate:.2f}  poisoned {upload[0]['query_auroc']:.3f}  "
                f"{flagged_text}  clean answer groups {min(clean):.3f}-{max(clean):.3f} ({len(clean)})",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "planted": planted, "base": base_settings(args)}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
