"""How unlike everyone else a group's members look: cross-validated classifier scores read as
conformal p-values.

The filter uses it once a backdoor's target response is known. Every poisoned sample gives the
target, and the samples that answer otherwise are (almost) all clean, so they are a reference for
what a clean sample's attention looks like. A classifier trained to tell the target's givers from
the rest learns the trigger's signature from all head shares at once; scored out of fold, a giver
that carries the signature ranks above nearly every reference sample, while a clean giver is
exchangeable with the reference and its p-value is uniform. This reads many correlated heads
jointly, where per-head votes count the same evidence several times over.

Which of the target's givers to flag is then a multiple-testing question: ``storey_qvalues``
turns their p-values into q-values (Storey's estimate of the share of true nulls, the clean
givers, times the Benjamini-Hochberg adjustment), so that a group the p-values say is nearly all
poison is flagged nearly whole, while the clean givers of a mixed group stay out at the chosen
false discovery rate.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import false_discovery_control
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

N_SPLITS = 5
MAX_PER_CLASS = 5000  # training samples per side: keeps 100k x 3,072-column profiles to seconds
REGULARIZATION = 0.1  # LogisticRegression's C on standardised columns (0.01-1 measured alike)
NULL_LAMBDA = 0.5  # Storey's lambda: p-values above it are counted as nulls


def member_pvalues(
    features: np.ndarray,
    members: np.ndarray,
    *,
    random_state: int | None = 0,
) -> np.ndarray:
    """The conformal p-value of each member of a group: (1 + the number of non-members scored at
    least as member-like) / (1 + the number of non-members), every score out of sample.

    A logistic regression (standardised ``features`` [N, D]) learns members against non-members in
    ``N_SPLITS`` stratified folds over at most ``MAX_PER_CLASS`` seeded samples of each; each
    sample is scored by the model that did not see it (members left out of the training sample by
    the mean of the fold models). Returns [N] with NaN for non-members, and 1.0 for every member
    when either side has too few samples to fold (no evidence).
    """
    x = np.asarray(features)  # rows are read as needed: a 100k x 3,072 profile stays float32
    member = np.asarray(members, dtype=bool)
    if x.ndim != 2 or member.shape != (x.shape[0],):
        raise ValueError(
            f"features must be [n_samples, n_columns] and members [n_samples], got {x.shape} and "
            f"{member.shape}"
        )
    pvalues = np.full(x.shape[0], np.nan)
    inside, outside = np.flatnonzero(member), np.flatnonzero(~member)
    if min(inside.size, outside.size) < N_SPLITS:
        pvalues[inside] = 1.0
        return pvalues
    rng = np.random.default_rng(random_state)
    train_in = np.sort(rng.choice(inside, size=min(inside.size, MAX_PER_CLASS), replace=False))
    reference = np.sort(rng.choice(outside, size=min(outside.size, MAX_PER_CLASS), replace=False))
    rows = np.concatenate([train_in, reference])
    labels = np.concatenate([np.ones(train_in.size, bool), np.zeros(reference.size, bool)])
    sample = x[rows].astype(np.float64)
    scores = np.full(x.shape[0], np.nan)
    unseen = np.setdiff1d(inside, train_in)
    unseen_scores = np.zeros(unseen.size)
    folds = StratifiedKFold(N_SPLITS, shuffle=True, random_state=random_state)
    for fit_idx, held_idx in folds.split(rows, labels):
        model = make_pipeline(StandardScaler(), LogisticRegression(C=REGULARIZATION, max_iter=2000))
        model.fit(sample[fit_idx], labels[fit_idx])
        scores[rows[held_idx]] = model.decision_function(sample[held_idx])
        if unseen.size:
            unseen_scores += model.decision_function(x[unseen].astype(np.float64)) / N_SPLITS
    scores[unseen] = unseen_scores
    ref = np.sort(scores[reference])
    at_least = ref.size - np.searchsorted(ref, scores[inside], side="left")
    pvalues[inside] = (1 + at_least) / (1 + ref.size)
    return pvalues


def storey_qvalues(pvalues: np.ndarray, *, null_lambda: float = NULL_LAMBDA) -> tuple[np.ndarray, float]:
    """Storey's q-values of ``pvalues`` (finite, in (0, 1]) and the estimated share of nulls.

    The null share is ``(1 + #(p > null_lambda)) / (m * (1 - null_lambda))``, capped at 1 (the
    conservative estimate of Storey, Taylor and Siegmund 2004); the q-values are the
    Benjamini-Hochberg adjusted p-values times it. Rejecting ``q <= level`` controls the false
    discovery rate at ``level``; with every p-value small the share is near 0 and nearly all are
    rejected, with none small it is 1 and this is plain Benjamini-Hochberg.
    """
    p = np.asarray(pvalues, dtype=float)
    if p.ndim != 1 or not np.isfinite(p).all() or (p <= 0).any() or (p > 1).any():
        raise ValueError("storey_qvalues needs a 1-D array of p-values in (0, 1]")
    if p.size == 0:
        return p.copy(), 1.0
    null_share = min(1.0, (1 + int(np.sum(p > null_lambda))) / (p.size * (1 - null_lambda)))
    return null_share * false_discovery_control(p, method="bh"), null_share
