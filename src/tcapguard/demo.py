"""The embedded default run: a poisoned upload on the tiny world, fine-tuned and measured.

This is what ``make demo`` runs on a fresh machine with no servers: build (or reuse) the cached
tiny world, poison its training split, fine-tune the clean base on it (the FTaaS job that implants
the backdoor), and report clean accuracy and attack success rate of the result.
"""

from __future__ import annotations

import time
from pathlib import Path

from tcapguard.attacks import Attack, make_triggered_testset
from tcapguard.evaluation import attack_success_rate, exact_match, generate_responses
from tcapguard.models import load_model
from tcapguard.tiny import TinyMLLMConfig
from tcapguard.tinyworld import BaseSpec, WorldSpec, build_world


def run_demo(
    *,
    family: str = "llava",
    attack: str = "badnet",
    rate: float = 0.1,
    seed: int = 0,
    cache_dir: str | Path | None = None,
) -> dict[str, float]:
    """Build the world, evaluate the fine-tuned model, print a short table and return the figures."""
    start = time.perf_counter()
    spec = WorldSpec(
        base=BaseSpec(model=TinyMLLMConfig(family=family)), attack=Attack.preset(attack), rate=rate, seed=seed
    )
    world = build_world(spec, cache_dir)
    model, processor = load_model(world.model)
    base_model, _ = load_model(world.base)
    test = world.load_test()
    triggered = make_triggered_testset(test, spec.attack)
    references = [r.response for r in test]
    figures = {}
    for name, m in (("base (before upload)", base_model), ("fine-tuned on upload", model)):
        figures[f"{name}: clean accuracy"] = exact_match(generate_responses(m, processor, test), references)
        figures[f"{name}: ASR"] = attack_success_rate(
            generate_responses(m, processor, triggered), spec.attack.target
        )
    manifest = world.load_manifest()
    print()
    print(
        f"tcapguard demo: tiny {family} world, {attack} at {rate:.0%} poison "
        f"({len(manifest.poisoned_ids)} of {len(world.load_train())} uploaded samples), "
        f"target {spec.attack.target!r}"
    )
    print(f"{'model':24s} {'clean acc':>10s} {'ASR':>8s}")
    for name in ("base (before upload)", "fine-tuned on upload"):
        print(f"{name:24s} {figures[f'{name}: clean accuracy']:10.3f} {figures[f'{name}: ASR']:8.3f}")
    print(f"world cached under {world.root} ({time.perf_counter() - start:.0f} s)")
    return figures
