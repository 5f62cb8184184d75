"""Binary Dawid-Skene recovers the annotators it was given."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from tcapguard.voting import dawid_skene


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
