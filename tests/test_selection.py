"""tcapguard.selection: which fine-tune the pipeline keeps, and the config that switches it on."""

from __future__ import annotations

import pytest

from tcapguard.selection import Candidate, SelectionConfig, select


def candidate(seed: int, residual_asr: float | None, clean_drop: float | None) -> Candidate:
    return Candidate(seed, f"model-{seed}", 0.7, clean_drop, residual_asr)


def test_the_lowest_residual_asr_within_the_clean_bar_is_kept():
    candidates = [candidate(0, 0.9, 0.0), candidate(1, 0.1, 0.05), candidate(2, 0.3, 0.01)]
    assert select(candidates, max_clean_drop=0.02).seed == 2  # seed 1 is lower but loses 5 points
    assert select(candidates, max_clean_drop=None).seed == 1


def test_when_no_candidate_keeps_clean_accuracy_the_lowest_residual_asr_is_kept():
    candidates = [candidate(0, 0.5, 0.1), candidate(1, 0.2, 0.3)]
    assert select(candidates, max_clean_drop=0.02).seed == 1


def test_ties_go_to_the_smaller_clean_drop_then_the_earlier_seed():
    assert select([candidate(0, 0.0, 0.01), candidate(1, 0.0, -0.01)], max_clean_drop=0.02).seed == 1
    assert select([candidate(4, 0.0, 0.0), candidate(3, 0.0, 0.0)], max_clean_drop=0.02).seed == 4


def test_without_a_detection_the_clean_drop_decides():
    """The filter off: no residual ASR to replay, so the candidate that keeps most clean accuracy."""
    assert select([candidate(0, None, 0.01), candidate(1, None, 0.0)], max_clean_drop=0.02).seed == 1


def test_nothing_to_select_from_is_an_error():
    with pytest.raises(ValueError, match="no candidates"):
        select([], max_clean_drop=0.02)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"seeds": [2]}, "two or more"),
        ({"seeds": [1, 1]}, "must differ"),
        ({"seeds": [0, "1"]}, "list of integers"),
        ({"seeds": [0, 1], "max_clean_drop": -0.1}, "max_clean_drop"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        SelectionConfig.from_dict(settings)


def test_off_by_default():
    assert not SelectionConfig().enabled and SelectionConfig(seeds=[0, 1]).enabled
