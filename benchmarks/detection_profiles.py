"""Detection quality on real attention profiles of poisoned tiny worlds: TCAP (defaults), the paper's
reading of TCAP, and BYE, per profile.

    PYTHONPATH=src .venv/bin/python benchmarks/detection_profiles.py /work/profiles

Each profile directory holds what ``tcapguard profile`` writes (meta.json + shard-*.npz) plus
``poisoned_ids.json`` (the true poisoned ids; read here only, never by the filters). Results: a table
on stdout and ``benchmarks/results/detection_profiles.json``.
"""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from tcapguard.detection import BYEFilter, TCAPFilter

FILTERS = {
    "tcap": TCAPFilter,
    "tcap-paper": lambda: TCAPFilter(n_heads=4, n_layers=2, split_rule="paper", head_selection="top"),
    "bye": BYEFilter,
}


def load(directory: Path) -> SimpleNamespace:
    """The profile through ``tcapguard.profiling.load_profile`` when present, else from the shards."""
    try:
        from tcapguard.profiling import load_profile

        return load_profile(directory)
    except ImportError:
        meta = json.loads((directory / "meta.json").read_text())
        shards = [np.load(directory / f"shard-{i:05d}.npz") for i in range(meta["n_shards"])]
        return SimpleNamespace(
            ids=[i for s in shards for i in s["ids"].tolist()],
            shares=np.concatenate([s["shares"] for s in shards]),
            vision_entropy=np.concatenate([s["vision_entropy"] for s in shards]),
            meta=meta,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("root", type=Path, help="folder of profile directories")
    parser.add_argument("--out", default="benchmarks/results/detection_profiles.json")
    args = parser.parse_args()
    rows = []
    for directory in sorted(p for p in args.root.iterdir() if (p / "poisoned_ids.json").exists()):
        profile = load(directory)
        truth = set(json.loads((directory / "poisoned_ids.json").read_text()))
        y = np.array([i in truth for i in profile.ids])
        row = {"profile": directory.name, "n_samples": int(y.size), "n_poisoned": int(y.sum())}
        for name, make in FILTERS.items():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                f = make().fit(profile)
            row[name] = {"flagged": f.n_flagged_, "decision": f.decision_}
            if y.any():
                row[name] |= {
                    "f1": round(f1_score(y, f.labels_, zero_division=0), 3),
                    "precision": round(precision_score(y, f.labels_, zero_division=0), 3),
                    "recall": round(recall_score(y, f.labels_, zero_division=0), 3),
                    "auroc": round(roc_auc_score(y, f.scores_), 3),
                }
        rows.append(row)
        cells = " | ".join(
            f"{k}: {row[k]['flagged']:4d} flagged, F1 {row[k].get('f1', '-')}, "
            f"AUROC {row[k].get('auroc', '-')}"
            for k in FILTERS
        )
        print(f"{directory.name:24s} poisoned {row['n_poisoned']:4d} | {cells}", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
