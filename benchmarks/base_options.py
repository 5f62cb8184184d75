"""The benchmarks' shared options for the tiny world's base (``tcapguard.tinyworld.BaseSpec``)."""

from __future__ import annotations

import argparse

from tcapguard.tiny import TinyMLLMConfig
from tcapguard.tinyworld import BaseSpec


def add_base_options(parser: argparse.ArgumentParser) -> None:
    """``--scene-weight``, ``--pretrain-samples``, ``--questions-per-scene``, ``--instruct-samples``
    and ``--instruct-passes``, defaulting to ``BaseSpec``'s own (``--scene-weight 0
    --pretrain-samples 32000`` is the earlier default world; ``--instruct-samples 80000`` adds the
    instruction stage, ``--instruct-passes 2`` splits it into two schedules)."""
    default = BaseSpec()
    parser.add_argument(
        "--scene-weight",
        type=float,
        default=default.scene_weight,
        help="BaseSpec.scene_weight (scene pre-training)",
    )
    parser.add_argument(
        "--pretrain-samples", type=int, default=default.pretrain_samples, help="BaseSpec.pretrain_samples"
    )
    parser.add_argument(
        "--questions-per-scene",
        type=int,
        default=default.questions_per_scene,
        help="BaseSpec.questions_per_scene (question-answer turns per pre-training scene)",
    )
    parser.add_argument(
        "--instruct-samples",
        type=int,
        default=default.instruct_samples,
        help="BaseSpec.instruct_samples (scenes of the instruction stage; 0: none)",
    )
    parser.add_argument(
        "--instruct-passes",
        type=int,
        default=default.instruct_passes,
        help="BaseSpec.instruct_passes (one-epoch schedules the instruction stage's scenes are split into)",
    )


def base_settings(args: argparse.Namespace) -> dict:
    """The options as BaseSpec keyword arguments (also recorded in each benchmark's results)."""
    return {
        "scene_weight": args.scene_weight,
        "pretrain_samples": args.pretrain_samples,
        "questions_per_scene": args.questions_per_scene,
        "instruct_samples": args.instruct_samples,
        "instruct_passes": args.instruct_passes,
    }


def base_spec(family: str, args: argparse.Namespace) -> BaseSpec:
    return BaseSpec(model=TinyMLLMConfig(family=family), **base_settings(args))
