"""Keep the best of several fine-tunes by what a deployment can see: residual ASR within a clean bar.

Robust fine-tuning on one upload breaks the backdoor at some fine-tuning seeds and not at others
(data order and the views' random cells; docs/measured/robust.md, "over fine-tuning seeds"). The true ASR
needs the attacker's trigger, but residual ASR (the filter's flags replayed, their suspected regions
pasted, through the model) does not, and over the benchmark's runs it tracked the true ASR closely
enough that keeping the lowest of three met issue 4's bar wherever one of the three did
(docs/measured/robust.md, "the lowest residual ASR of three fine-tunes"). The pipeline fine-tunes once per
``SelectionConfig.seeds``, measures each candidate on a validation split the gate does not judge on,
and hands the kept one to the evaluation and the gate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from tcapguard.config import StepConfig


@dataclass
class SelectionConfig(StepConfig):
    """Fine-tune once per seed and keep one candidate (off while ``seeds`` is empty).

    Needs ``data.validation`` in the pipeline: a clean split other than the gate's test split, so the
    figures that choose a model are not the ones that judge it.
    """

    # FinetuneConfig.seed of each candidate fine-tune; empty: one fine-tune, nothing to select
    seeds: list[int] = field(default_factory=list)
    # a candidate whose clean score on the validation split falls more than this below the probe
    # model's is kept only if every candidate does (in the clean metric's units); None: not checked
    max_clean_drop: float | None = 0.02

    def __post_init__(self) -> None:
        if not isinstance(self.seeds, list) or not all(
            isinstance(s, int) and not isinstance(s, bool) for s in self.seeds
        ):
            raise ValueError(f"seeds must be a list of integers, got {self.seeds!r}")
        if len(self.seeds) == 1:
            raise ValueError(
                f"seeds: give two or more fine-tuning seeds to select from, or none; got {self.seeds}"
            )
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must differ, got {self.seeds}")
        if self.max_clean_drop is not None and not self.max_clean_drop >= 0:
            raise ValueError(f"max_clean_drop must be >= 0 or None, got {self.max_clean_drop}")

    @property
    def enabled(self) -> bool:
        return bool(self.seeds)


@dataclass(frozen=True)
class Candidate:
    """One fine-tune's figures on the validation split (None: not measurable, see :func:`select`)."""

    seed: int
    model: str
    clean_score: float | None
    clean_drop: float | None  # the probe model's clean score minus this one's
    residual_asr: float | None  # None when there is no detection to replay (the filter is off)

    def keeps_clean(self, max_clean_drop: float | None) -> bool:
        return max_clean_drop is None or self.clean_drop is None or self.clean_drop <= max_clean_drop

    def to_dict(self) -> dict:
        return asdict(self)


def select(candidates: Sequence[Candidate], max_clean_drop: float | None) -> Candidate:
    """The candidate with the lowest residual ASR among those within ``max_clean_drop`` (among all
    when none is); ties go to the smaller clean drop, then to the earlier candidate. A missing
    residual ASR ranks as 0 (nothing to replay), a missing clean drop as none."""
    if not candidates:
        raise ValueError("no candidates to select from")
    return min(
        candidates,
        key=lambda c: (not c.keeps_clean(max_clean_drop), c.residual_asr or 0.0, c.clean_drop or 0.0),
    )
