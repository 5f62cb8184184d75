"""Kubeflow components, one file each: thin calls into :mod:`tcapguard.orchestration`, which runs one
step of :data:`tcapguard.pipeline.STEP_FUNCTIONS`. ``pipelines/tcapguard_pipeline.py`` wires them.

No ``from __future__ import annotations`` in these files: KFP reads the annotations as types.
"""

from components.evaluate import evaluate
from components.fanout import finetune_seeds, worker_indices
from components.filter import tcap_filter
from components.finetune import finetune
from components.gate import gate
from components.merge_profile import merge_profile
from components.probe_finetune import probe_finetune
from components.profile import profile_attention
from components.promote import promote, reject
from components.select import select_model

__all__ = [
    "evaluate",
    "finetune",
    "finetune_seeds",
    "gate",
    "merge_profile",
    "probe_finetune",
    "profile_attention",
    "promote",
    "reject",
    "select_model",
    "tcap_filter",
    "worker_indices",
]
