"""Binary Dawid-Skene EM: heads are annotators, each with its own sensitivity and specificity.

Every selected head casts a vote (poisoned / clean) per sample. Dawid & Skene (1979) treat the true
label as latent and estimate, by EM, the prior of the poison class and one confusion matrix per
annotator, so a head that votes poison on clean samples counts for less. The binary case needs two
numbers per head: sensitivity P(vote=1 | poisoned) and specificity P(vote=0 | clean).

Two additions for this use: a Beta prior on the poison class prior (poison is a minority; the prior
keeps EM from swapping the classes when most heads vote yes on a large group), and Laplace-style
pseudo-counts on each head's rates so a head that never votes does not get a rate of exactly 0 or 1.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace

import numpy as np
from scipy.special import expit


@dataclass
class DawidSkeneResult:
    """Consensus of binary annotators. ``posterior`` [N] is P(poisoned | votes)."""

    posterior: np.ndarray
    prior: float
    sensitivity: np.ndarray  # [J] P(vote = 1 | poisoned)
    specificity: np.ndarray  # [J] P(vote = 0 | clean)
    n_iter: int
    converged: bool
    log_likelihood: float


def _logit(p: np.ndarray | float) -> np.ndarray:
    return np.log(p) - np.log1p(-p)


def dawid_skene(
    votes: np.ndarray,
    *,
    prior_strength: tuple[float, float] = (1.0, 1.0),
    rate_pseudocount: float = 0.5,
    max_iter: int = 200,
    tol: float = 1e-6,
) -> DawidSkeneResult:
    """Binary Dawid-Skene EM on ``votes`` [N, J] (1 = poisoned), started from the mean vote.

    ``prior_strength`` = (a, b) of a Beta(a, b) prior on the poison class prior; (1, 1) is flat and
    (1, 9) says "about a tenth at most, probably less". ``rate_pseudocount`` is added to the counts of
    both outcomes of each head's sensitivity and specificity. If EM ends with heads on average worse
    than chance (sensitivity + specificity < 1) the two classes are swapped, the usual
    identifiability fix.
    """
    v = np.asarray(votes)
    if v.ndim != 2 or v.shape[1] < 1:
        raise ValueError(f"votes must be a [n_samples, n_annotators] array, got shape {v.shape}")
    if not np.isin(v, (0, 1)).all():
        raise ValueError("votes must be 0/1 (or boolean)")
    a, b = prior_strength
    if a <= 0 or b <= 0 or rate_pseudocount < 0:
        raise ValueError("prior_strength entries must be > 0 and rate_pseudocount >= 0")
    v = v.astype(np.float64)
    n = v.shape[0]
    t = v.mean(axis=1)
    c = rate_pseudocount
    prev = -np.inf
    converged = False
    n_iter = 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (reported after the loop)
        tp = t.sum()
        prior = np.clip((tp + a - 1) / (n + a + b - 2), 1e-9, 1 - 1e-9)
        sens = np.clip((t @ v + c) / (tp + 2 * c), 1e-9, 1 - 1e-9)
        spec = np.clip(((1 - t) @ (1 - v) + c) / (n - tp + 2 * c), 1e-9, 1 - 1e-9)
        log_pos = np.log(prior) + v @ np.log(sens) + (1 - v) @ np.log1p(-sens)
        log_neg = np.log1p(-prior) + v @ np.log1p(-spec) + (1 - v) @ np.log(spec)
        top = np.maximum(log_pos, log_neg)
        norm = top + np.log(np.exp(log_pos - top) + np.exp(log_neg - top))
        t = np.exp(log_pos - norm)
        ll = float(norm.sum())
        if abs(ll - prev) < tol * max(1.0, abs(ll)):
            converged = True
            break
        prev = ll
    if not converged:
        warnings.warn(f"Dawid-Skene EM did not converge in {max_iter} iterations", stacklevel=2)
    if (sens + spec).mean() < 1:
        t, prior, sens, spec = 1 - t, 1 - prior, 1 - spec, 1 - sens
    return DawidSkeneResult(t, float(prior), sens, spec, n_iter, converged, ll)


def restrict_positives(
    result: DawidSkeneResult,
    votes: np.ndarray,
    eligible: np.ndarray,
    *,
    max_iter: int = 200,
    tol: float = 1e-9,
) -> DawidSkeneResult:
    """``result`` when only the ``eligible`` samples can be positive (poisoned).

    The annotators' fitted sensitivity and specificity are kept; the positive class's prior is
    re-estimated among the eligible samples alone (EM on one mixing weight, add-one smoothed) and
    every other sample's posterior is 0. For a backdoor whose target response is known, the
    eligible samples are the ones giving it: a poisoned training sample always does, so within
    that group poison is the majority and an ambiguous vote tips to poisoned, while outside it no
    vote can make a sample poisoned.
    """
    v = np.asarray(votes, dtype=np.float64)
    member = np.asarray(eligible, dtype=bool)
    if v.shape != (result.posterior.size, result.sensitivity.size) or member.shape != (v.shape[0],):
        raise ValueError(
            f"votes {v.shape} and eligible {member.shape} must match the result's "
            f"{result.posterior.size} samples x {result.sensitivity.size} annotators"
        )
    sens, spec = result.sensitivity, result.specificity
    llr = v[member] @ (np.log(sens) - np.log1p(-spec)) + (1 - v[member]) @ (np.log1p(-sens) - np.log(spec))
    posterior = np.zeros(v.shape[0])
    m = int(member.sum())
    if m == 0:
        return replace(result, posterior=posterior, prior=0.0)
    post = result.posterior[member]
    for _ in range(max_iter):
        prior = (post.sum() + 1) / (m + 2)
        new = expit(llr + np.log(prior) - np.log1p(-prior))
        done = np.abs(new - post).max() < tol
        post = new
        if done:
            break
    posterior[member] = post
    return replace(result, posterior=posterior, prior=float(posterior.mean()))
