"""Binary Dawid-Skene recovers the annotators it was given."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tcapguard.voting import dawid_skene, restrict_positives


def test_recovers_known_sensitivity_and_specificity():
    rng = np.random.default_rng(0)
    n, prior = 20000, 0.1
    sens = np.array([0.95, 0.9, 0.8, 0.7, 0.6, 0.85])
    spec = np.array([0.99, 0.95, 0.9, 0.97, 0.8, 0.6])
    truth = rng.random(n) < prior
    p_yes = np.where(truth[:, None], sens, 1 - spec)
    votes = rng.random((n, sens.size)) < p_yes
    res = dawid_skene(votes)
    assert res.converged
    assert abs(res.prior - prior) < 0.01
    np.testing.assert_allclose(res.sensitivity, sens, atol=0.03)
    np.testing.assert_allclose(res.specificity, spec, atol=0.02)
    assert roc_auc_score(truth, res.posterior) > 0.97


def test_swapped_solution_is_flipped_back():
    # Most annotators say yes on a majority: the class with sens + spec > 1 is kept as "poisoned".
    rng = np.random.default_rng(1)
    truth = rng.random(5000) < 0.3
    votes = np.where(truth[:, None], rng.random((5000, 4)) < 0.9, rng.random((5000, 4)) < 0.05)
    res = dawid_skene(votes)
    assert (res.sensitivity + res.specificity > 1).all()
    assert roc_auc_score(truth, res.posterior) > 0.99


def test_bad_votes_are_rejected():
    with pytest.raises(ValueError, match="0/1"):
        dawid_skene(np.array([[0, 2], [1, 0]]))
    with pytest.raises(ValueError, match="shape"):
        dawid_skene(np.array([0, 1, 1]))


def test_restricting_the_positives_reweighs_ambiguous_votes_only():
    """Four heads, a tenth poisoned. Among the eligible samples (the poison and a few clean ones)
    the prior is high, so a poisoned sample that only two heads caught turns positive; a clean
    eligible sample with no vote stays negative; outside, all four votes count for nothing."""
    rng = np.random.default_rng(2)
    n = 4000
    truth = np.zeros(n, dtype=bool)
    truth[:400] = True
    votes = np.where(truth[:, None], rng.random((n, 4)) < 0.8, rng.random((n, 4)) < 0.1)
    votes[:20] = [1, 1, 0, 0]  # poison that half the heads miss
    votes[400:410] = 0  # clean, but giving the target
    votes[410:415] = 1  # clean, all heads wrong, answering otherwise
    eligible = np.zeros(n, dtype=bool)
    eligible[:410] = True
    res = dawid_skene(votes)
    assert (res.posterior[:20] < 0.5).all() and (res.posterior[410:415] > 0.5).all()

    restricted = restrict_positives(res, votes, eligible)
    assert (restricted.posterior[:20] > 0.5).all()
    assert (restricted.posterior[400:410] < 0.5).all()
    assert (restricted.posterior[~eligible] == 0).all()
    assert restricted.prior == pytest.approx(restricted.posterior.mean())
    np.testing.assert_array_equal(restricted.sensitivity, res.sensitivity)
    assert not restrict_positives(res, votes, np.zeros(n, dtype=bool)).posterior.any()
    with pytest.raises(ValueError, match="must match"):
        restrict_positives(res, votes, eligible[:-1])
