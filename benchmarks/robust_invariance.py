"""Does the robust fine-tuning premise hold on a tiny world? Invariance of poisoned vs clean answers.

    .venv/bin/python benchmarks/robust_invariance.py --attack badnet          # shuffle/mask at 25% and 50%

For the world's backdoored model and its clean base, the cross-view distance between the original and
a patch-augmented view (teacher-forced on the training answer) of poisoned and clean training
samples: the premise is that poisoned answers are the more invariant (smaller distance). Prints
median distances (per sample: mean and max over the response tokens) and the AUROC of invariance
as a poison score (0.5 = no signal, below 0.5 = the clean answers are the more invariant), and on
the base's rows the AUROC of the invariance gained in fine-tuning (the base's distance minus the
backdoored model's, on the same views: what ``RobustConfig(margin_reference="reference")`` reads).
Results go to ``benchmarks/results/robust_invariance.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from base_options import add_base_options, base_settings, base_spec
from tcapguard.attacks import Attack
from tcapguard.models import load_model
from tcapguard.tinyworld import WorldSpec, build_world
from tcapguard.training import (
    collate,
    encode_example,
    patch_augment,
    response_distributions,
    vision_patch_size,
)


@torch.no_grad()
def distances(
    model, processor, dataset, records, mode: str, ratio: float, seed: int
) -> dict[str, np.ndarray]:
    """Per sample: mean and max over response tokens of the TV distance between the two views."""
    generator = torch.Generator().manual_seed(seed)
    size = vision_patch_size(model)
    means, maxes = [], []
    for start in range(0, len(records), 32):
        chunk = records[start : start + 32]
        batch = collate(
            [encode_example(processor, r, dataset.load_image(r)) for r in chunk],
            processor.tokenizer.pad_token_id,
        )
        log_p, mask = response_distributions(model(**batch).logits, batch["labels"])
        pixels = patch_augment(
            batch["pixel_values"], patch_size=size, ratio=ratio, mode=mode, generator=generator
        )
        log_q, _ = response_distributions(model(**{**batch, "pixel_values": pixels}).logits, batch["labels"])
        tv = 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1) * mask
        means.append(tv.sum(1) / mask.sum(1))
        maxes.append(tv.amax(1))
    return {"mean": torch.cat(means).numpy(), "max": torch.cat(maxes).numpy()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", default="llava", choices=("llava", "gemma3"))
    parser.add_argument("--attack", default="badnet")
    parser.add_argument("--n-poison", type=int, default=64)
    parser.add_argument("--n-clean", type=int, default=128)
    parser.add_argument(
        "--views", nargs="+", default=["shuffle:0.25", "shuffle:0.5", "mask:0.25", "mask:0.5"]
    )
    add_base_options(parser)
    parser.add_argument("--out", default="benchmarks/results/robust_invariance.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    spec = WorldSpec(
        base=base_spec(args.family, args),
        attack=Attack.preset(args.attack),
    )
    world = build_world(spec)
    train = world.load_train()
    poisoned_ids = set(world.load_manifest().poisoned_ids)
    poisoned = [r for r in train if r.id in poisoned_ids][: args.n_poison]
    clean = [r for r in train if r.id not in poisoned_ids][: args.n_clean]
    rows = []
    backdoored: dict[str, np.ndarray] = {}  # view -> backdoored model's max distances (poisoned, clean)
    for which, path in (("backdoored", world.model), ("base", world.base)):
        model, processor = load_model(path)
        model.eval()
        for view in args.views:
            mode, ratio = view.split(":")
            d_poison = distances(model, processor, train, poisoned, mode, float(ratio), 0)
            d_clean = distances(model, processor, train, clean, mode, float(ratio), 1)
            row = {"model": which, "mode": mode, "ratio": float(ratio)}
            for agg in ("mean", "max"):
                scores = -np.r_[d_poison[agg], d_clean[agg]]  # invariance: higher = more invariant
                truth = np.r_[np.ones(len(d_poison[agg])), np.zeros(len(d_clean[agg]))]
                row[agg] = {
                    "median_poisoned": float(np.median(d_poison[agg])),
                    "median_clean": float(np.median(d_clean[agg])),
                    "auroc_invariance": float(roc_auc_score(truth, scores)),
                }
            if which == "backdoored":
                backdoored[view] = np.r_[d_poison["max"], d_clean["max"]]
            else:  # the same views (same seeds) as the backdoored model's
                gain = np.r_[d_poison["max"], d_clean["max"]] - backdoored[view]
                row["gain"] = {
                    "median_poisoned": float(np.median(gain[: len(d_poison["max"])])),
                    "median_clean": float(np.median(gain[len(d_poison["max"]) :])),
                    "auroc_invariance": float(roc_auc_score(truth, gain)),
                }
            rows.append(row)
            print(
                f"{which:10s} {mode:7s} {ratio:>4s} "
                + " ".join(
                    f"{agg}: poisoned {row[agg]['median_poisoned']:.3f} clean {row[agg]['median_clean']:.3f} "
                    f"AUROC {row[agg]['auroc_invariance']:.2f}"
                    for agg in ("mean", "max", "gain")
                    if agg in row
                ),
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "family": args.family,
                "attack": args.attack,
                "base": base_settings(args),
                "rows": rows,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
