"""Conformal p-values of a group's members against the rest (tcapguard.conformal)."""

import numpy as np
import pytest
from scipy.stats import false_discovery_control

from tcapguard import conformal
from tcapguard.conformal import member_pvalues, storey_qvalues


def _upload(n=1500, d=40, n_members=150, shift=1.0, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    members = np.zeros(n, dtype=bool)
    members[rng.choice(n, n_members, replace=False)] = True
    x[members, :10] += shift  # a joint signature: each column alone overlaps the rest heavily
    return x, members


def test_members_with_a_signature_rank_above_the_reference():
    x, members = _upload(shift=1.5)
    p = member_pvalues(x, members)
    assert np.isnan(p[~members]).all()
    assert (p[members] <= 0.01).mean() >= 0.9
    # no single column separates them that well: the classifier reads the columns jointly
    one = member_pvalues(x[:, :1], members)
    assert (one[members] <= 0.01).mean() < 0.3


def test_members_like_the_reference_get_uniform_pvalues():
    """A clean sample that happens to give the target is exchangeable with the reference: its
    p-value is uniform, so it passes the test at alpha with probability about alpha."""
    x, members = _upload(shift=0.0, n=3000, n_members=600)
    p = member_pvalues(x, members)[members]
    assert 0.4 < p.mean() < 0.6
    assert (p <= 0.05).mean() < 0.1


def test_members_left_out_of_the_training_sample_are_scored_out_of_sample(monkeypatch):
    monkeypatch.setattr(conformal, "MAX_PER_CLASS", 60)
    x, members = _upload(shift=1.5)
    p = member_pvalues(x, members)
    assert np.isfinite(p[members]).all() and (p[members] <= 0.05).mean() >= 0.8
    assert p[members].min() >= 1 / 61  # the reference is the 60 sampled non-members


def test_too_few_to_fold_is_no_evidence():
    x, members = _upload(n_members=3)
    p = member_pvalues(x, members)
    assert (p[members] == 1.0).all() and np.isnan(p[~members]).all()


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"features must be \[n_samples, n_columns\]"):
        member_pvalues(np.zeros((10, 2)), np.zeros(9, dtype=bool))


def test_qvalues_of_a_group_that_is_all_signal_reject_it_whole():
    """The measured LLaVA Blend 5% case: 80-87 of 100 poisoned givers at p <= 0.01, the rest
    spread up to 0.49, none above 0.5. The null share is estimated near 0, so every q-value falls
    below 0.01, where a per-giver threshold of 0.01 keeps 13-20 of them."""
    p = np.concatenate([np.full(85, 0.0005), np.linspace(0.011, 0.49, 15)])
    q, share = storey_qvalues(p)
    assert share == pytest.approx(1 / 50)  # (1 + 0 above 0.5) / (100 * 0.5)
    assert (q <= 0.01).all() and (p <= 0.01).sum() == 85


def test_qvalues_of_uniform_pvalues_are_benjamini_hochberg():
    """All nulls: the share is capped at 1, the q-values are the BH adjustment, and at a 1%
    false discovery rate nothing is rejected."""
    p = np.random.default_rng(0).uniform(size=400)
    q, share = storey_qvalues(p)
    assert share == 1.0
    np.testing.assert_allclose(q, false_discovery_control(p, method="bh"))
    assert not (q <= 0.01).any()


def test_qvalues_of_a_mixed_group_keep_most_nulls_out():
    """100 signals and 40 nulls: the share estimate is near 40/140 and the nulls rejected stay few."""
    rng = np.random.default_rng(1)
    p = np.concatenate([np.full(100, 0.0005), rng.uniform(size=40)])
    q, share = storey_qvalues(p)
    assert 0.15 < share < 0.45
    assert (q[:100] <= 0.01).all() and (q[100:] <= 0.01).sum() <= 2


@pytest.mark.parametrize("bad", [[0.5, np.nan], [0.0, 0.3], [1.2], [[0.1, 0.2]]])
def test_qvalues_refuse_what_is_not_a_pvalue(bad):
    with pytest.raises(ValueError, match="p-values in"):
        storey_qvalues(np.array(bad))
