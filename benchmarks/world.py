"""Train the tiny world per attack at 10% poison; print clean accuracy, ASR and training time.

    .venv/bin/python benchmarks/world.py                      # both families, five attacks
    .venv/bin/python benchmarks/world.py --family llava --attacks badnet text

Worlds are cached by content hash (``TCAPGUARD_CACHE``, default ``.cache/tcapguard``): a second
run only evaluates. Results go to ``benchmarks/results/world.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from base_options import add_base_options, base_settings, base_spec
from tcapguard.attacks import Attack, make_triggered_testset
from tcapguard.evaluation import attack_success_rate, exact_match, generate_responses
from tcapguard.models import load_model
from tcapguard.tinyworld import WorldSpec, build_base, build_world

ATTACKS = ("badnet", "blend", "sig", "wanet", "text", "ftrojan", "dual")


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def objects(record) -> str:
    """How many shapes the record's scene holds, "one" or "several". With one shape every question
    is answered by what the image holds at all; with several, only by finding the shape that the
    question names (a content lookup)."""
    return "one" if len(record.extra["scene"]) == 1 else "several"


def accuracy_by(answers: list[str], test, key) -> dict[str, float]:
    """Exact-match accuracy per value of ``key(record)``."""
    groups: dict[str, list[int]] = {}
    for i, record in enumerate(test.records):
        groups.setdefault(key(record), []).append(i)
    return {
        name: exact_match([answers[i] for i in idx], [test.records[i].response for i in idx])
        for name, idx in sorted(groups.items())
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--family", nargs="+", default=["llava", "gemma3"])
    parser.add_argument(
        "--attacks", nargs="+", default=["badnet", "blend", "sig", "wanet", "text"], choices=ATTACKS
    )
    parser.add_argument("--rate", type=float, default=0.10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=WorldSpec.n_train, help="samples in the upload")
    parser.add_argument("--epochs", type=int, default=None, help="fine-tune epochs (default: WorldSpec's)")
    add_base_options(parser)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", default="benchmarks/results/world.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for family in args.family:
        base_config = base_spec(family, args)
        base = build_base(base_config)
        for kind in args.attacks:
            attack = Attack.preset(kind)
            spec = WorldSpec(
                base=base_config, attack=attack, rate=args.rate, n_train=args.n_train, seed=args.seed
            )
            if args.epochs is not None:
                spec = replace(spec, finetune=replace(spec.finetune, epochs=args.epochs))
            world, seconds = timed(build_world, spec)
            train_log = json.loads((world.model / "tcapguard_finetune.json").read_text())
            model, processor = load_model(world.model)
            test = world.load_test()
            answers = generate_responses(model, processor, test)
            clean = exact_match(answers, [r.response for r in test])
            by_qtype = accuracy_by(answers, test, lambda r: r.extra["qtype"])
            by_objects = accuracy_by(answers, test, objects)
            by_both = accuracy_by(answers, test, lambda r: f"{r.extra['qtype']}/{objects(r)}")
            triggered = make_triggered_testset(test, attack)
            asr = attack_success_rate(generate_responses(model, processor, triggered), attack.target)
            row = {
                "family": family,
                "attack": kind,
                "rate": args.rate,
                "seed": args.seed,
                "n_train": args.n_train,
                "epochs": spec.finetune.epochs,
                "clean_accuracy": clean,
                "clean_accuracy_by_question": by_qtype,
                "clean_accuracy_by_objects": by_objects,
                "clean_accuracy_by_question_and_objects": by_both,
                "asr": asr,
                "finetune_seconds": train_log["seconds"],
                # the base's last training stage (the instruction stage where there is one)
                "base_seconds": json.loads((base / "tcapguard_finetune.json").read_text())["seconds"],
                "base": base_settings(args),
                "cached": seconds < 0.5 * train_log["seconds"],
            }
            rows.append(row)
            print(
                f"{family:8s} {kind:8s} clean={clean:.3f} asr={asr:.3f} "
                f"finetune={row['finetune_seconds']:.0f}s base={row['base_seconds']:.0f}s",
                flush=True,
            )
    print()
    print(
        "| family | attack | clean acc | ASR | fine-tune s | base's last stage s | clean acc by question type"
        " | clean acc by shapes in the scene |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['family']} | {r['attack']} | {r['clean_accuracy']:.3f} | {r['asr']:.3f} | "
            f"{r['finetune_seconds']:.0f} | {r['base_seconds']:.0f} | "
            + ", ".join(f"{q} {v:.2f}" for q, v in r["clean_accuracy_by_question"].items())
            + " | "
            + ", ".join(f"{q} {v:.2f}" for q, v in r["clean_accuracy_by_objects"].items())
            + " |"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "torch_threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
