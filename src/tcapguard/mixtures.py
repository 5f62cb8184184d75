"""Many one-dimensional Gaussian mixtures fitted at once: one batched EM over all attention heads.

TCAP fits a 1-D mixture with K = 1..5 components to every head's normalised system share and keeps
the K with the lowest AIC. Per head, scikit-learn's ``GaussianMixture`` does exactly this and stays the
reference implementation (the tests compare against it), but a Python loop over 1,024 heads x 5 values
of K x 100k samples takes tens of minutes. Here the EM steps run as array operations over a batch of
series, with the parameter names of scikit-learn (``n_components``, ``weights_``, ``means_``,
``covariances_``, ``reg_covar``, ``tol``, ``max_iter``, ``n_init``) and its update rules (k-means start,
``reg_covar`` added to every variance, stop when the mean log-likelihood moves by less than ``tol``).

Large inputs are binned: each series is reduced to ``n_bins`` weighted points carrying the count, mean
and within-bin variance of the samples in the bin. The M-step is then exact for a given assignment of
bins and the E-step treats all samples of a bin alike, which costs little when bins are much narrower
than the components (a component can never be narrower than ``sqrt(reg_covar)``). With
``n_bins=None`` every sample is its own point and the fit is plain EM.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

_EPS = 10 * np.finfo(np.float64).eps  # scikit-learn's floor on component mass
_LOG_2PI = math.log(2 * math.pi)


class ConvergenceWarning(UserWarning):
    """EM stopped at ``max_iter`` before the log-likelihood settled (as in scikit-learn)."""


class WeightedPoints:
    """Series reduced to weighted points: positions, counts and within-point variances, each [B, M]."""

    def __init__(self, positions: np.ndarray, counts: np.ndarray, spread: np.ndarray, n_samples: int):
        self.positions = positions
        self.counts = counts
        self.spread = spread
        self.n_samples = n_samples

    @classmethod
    def from_samples(cls, X: np.ndarray, n_bins: int | None) -> WeightedPoints:
        """``X`` [n_samples, n_series] -> points; binned when ``n_bins`` is set and smaller than n_samples.

        A bin is represented by its centre, its count and the variance of a uniform spread over its
        width (width^2 / 12, Sheppard's correction), which keeps narrow components honest.
        """
        n, b = X.shape
        if n_bins is None or n_bins >= n:
            pos = np.ascontiguousarray(X.T, dtype=np.float64)
            return cls(pos, np.ones_like(pos), np.zeros_like(pos), n)
        lo = X.min(axis=0).astype(np.float64)
        hi = X.max(axis=0).astype(np.float64)
        width = np.where(hi > lo, (hi - lo) / n_bins, 1.0 / n_bins)
        idx = ((X - lo.astype(X.dtype)) * (1.0 / width).astype(X.dtype)).astype(np.int64)
        np.minimum(idx, n_bins - 1, out=idx)
        idx += np.arange(b, dtype=np.int64) * n_bins
        counts = np.bincount(idx.ravel(), minlength=b * n_bins).reshape(b, n_bins).astype(np.float64)
        centres = lo[:, None] + (np.arange(n_bins) + 0.5)[None, :] * width[:, None]
        spread = np.broadcast_to((width**2 / 12)[:, None], counts.shape)
        # Drop empty bins: keep the non-empty ones first in each row and cut at the longest row.
        order = np.argsort(counts == 0, axis=1, kind="stable")[:, : int((counts > 0).sum(axis=1).max())]
        take = np.take_along_axis
        return cls(take(centres, order, 1), take(counts, order, 1), take(spread, order, 1), n)

    def subset(self, rows: np.ndarray) -> WeightedPoints:
        return WeightedPoints(self.positions[rows], self.counts[rows], self.spread[rows], self.n_samples)


def _log_prob(pts: WeightedPoints, w: np.ndarray, mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """Weighted log density of every point under every component, [B, M, K]."""
    d = pts.positions[:, :, None] - mu[:, None, :]
    sq = d * d + pts.spread[:, :, None]
    with np.errstate(divide="ignore"):
        logw = np.log(w)
    return (logw - 0.5 * (_LOG_2PI + np.log(var)))[:, None, :] - 0.5 * sq / var[:, None, :]


def _logsumexp(a: np.ndarray) -> np.ndarray:
    top = a.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    return (top + np.log(np.exp(a - top).sum(axis=-1, keepdims=True)))[..., 0]


def _m_step(pts: WeightedPoints, resp: np.ndarray, reg_covar: float):
    rc = resp * pts.counts[:, :, None]
    nk = rc.sum(axis=1) + _EPS
    mu = np.einsum("bmk,bm->bk", rc, pts.positions) / nk
    d = pts.positions[:, :, None] - mu[:, None, :]
    var = (rc * (d * d + pts.spread[:, :, None])).sum(axis=1) / nk + reg_covar
    return nk / pts.n_samples, mu, var


def _kmeans_1d(pts: WeightedPoints, centres: np.ndarray, n_iter: int = 50) -> np.ndarray:
    """Weighted Lloyd iterations in one dimension, batched; returns hard assignments [B, M].

    In 1-D the nearest centre is found by locating each point between the midpoints of the sorted
    centres, and cluster sums are differences of cumulative sums over the sorted points, so an
    iteration costs O(B K log M) instead of O(B M K).
    """
    b, m = pts.positions.shape
    order = np.argsort(pts.positions, axis=1)
    pos = np.take_along_axis(pts.positions, order, 1)
    w = np.take_along_axis(pts.counts, order, 1)
    zero = np.zeros((b, 1))
    cw = np.concatenate([zero, np.cumsum(w, axis=1)], axis=1)
    cs = np.concatenate([zero, np.cumsum(w * pos, axis=1)], axis=1)
    # Rows are made disjoint by an offset so one searchsorted serves the whole batch.
    span = float(pos.max() - pos.min()) + 1.0
    offset = (np.arange(b) * span)[:, None]
    flat = (pos + offset).ravel()
    rows = np.arange(b)[:, None]
    for _ in range(n_iter):
        c = np.sort(centres, axis=1)
        mids = (c[:, :-1] + c[:, 1:]) / 2
        cut = np.searchsorted(flat, (mids + offset).ravel()).reshape(b, -1) - rows * m
        edges = np.concatenate([np.zeros((b, 1), dtype=np.int64), cut, np.full((b, 1), m)], axis=1)
        wk = np.diff(np.take_along_axis(cw, edges, 1), axis=1)
        sk = np.diff(np.take_along_axis(cs, edges, 1), axis=1)
        new = np.where(wk > 0, sk / np.maximum(wk, 1e-300), c)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            centres = new
            break
        centres = new
    c = np.sort(centres, axis=1)
    mids = (c[:, :-1] + c[:, 1:]) / 2
    return (pts.positions[:, :, None] > mids[:, None, :]).sum(axis=2)


def _quantile_centres(pts: WeightedPoints, k: int) -> np.ndarray:
    """Weighted quantiles at (j + 0.5) / k: a deterministic k-means start."""
    order = np.argsort(pts.positions, axis=1)
    pos = np.take_along_axis(pts.positions, order, 1)
    cum = np.cumsum(np.take_along_axis(pts.counts, order, 1), axis=1)
    targets = (np.arange(k) + 0.5) / k * cum[:, -1:]
    idx = np.minimum(
        np.array([np.searchsorted(c, t) for c, t in zip(cum, targets, strict=True)]), pos.shape[1] - 1
    )
    return np.take_along_axis(pos, idx, 1)


def _kmeanspp_centres(pts: WeightedPoints, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding on weighted points (for restarts beyond the first)."""
    b, m = pts.positions.shape
    rows = np.arange(b)
    p = pts.counts / pts.counts.sum(axis=1, keepdims=True)
    first = np.array([rng.choice(m, p=pr) for pr in p])
    centres = [pts.positions[rows, first]]
    d2 = (pts.positions - centres[0][:, None]) ** 2
    for _ in range(1, k):
        wgt = d2 * pts.counts
        tot = wgt.sum(axis=1, keepdims=True)
        pr = np.where(tot > 0, wgt / np.where(tot > 0, tot, 1.0), p)
        nxt = np.array([rng.choice(m, p=q / q.sum()) for q in pr])
        centres.append(pts.positions[rows, nxt])
        d2 = np.minimum(d2, (pts.positions - centres[-1][:, None]) ** 2)
    return np.stack(centres, axis=1)


def _fit_fixed_k(
    pts: WeightedPoints,
    k: int,
    *,
    tol: float,
    reg_covar: float,
    max_iter: int,
    n_init: int,
    rng: np.random.Generator,
):
    """EM for one K over all series; best of ``n_init`` starts by lower bound (scikit-learn's rule)."""
    b = pts.positions.shape[0]
    best = None
    for init in range(n_init):
        centres = _quantile_centres(pts, k) if init == 0 else _kmeanspp_centres(pts, k, rng)
        labels = _kmeans_1d(pts, centres)
        resp = (labels[:, :, None] == np.arange(k)).astype(np.float64)
        w, mu, var = _m_step(pts, resp, reg_covar)
        lower = np.full(b, -np.inf)
        converged = np.zeros(b, dtype=bool)
        n_iter = np.zeros(b, dtype=np.int64)
        active = np.arange(b)
        for it in range(1, max_iter + 1):
            sub = pts.subset(active)
            lp = _log_prob(sub, w[active], mu[active], var[active])
            norm = _logsumexp(lp)
            new_lower = (norm * sub.counts).sum(axis=1) / pts.n_samples
            resp = np.exp(lp - norm[:, :, None])
            w[active], mu[active], var[active] = _m_step(sub, resp, reg_covar)
            change = new_lower - lower[active]
            lower[active] = new_lower
            n_iter[active] = it
            done = np.abs(change) < tol
            converged[active[done]] = True
            active = active[~done]
            if active.size == 0:
                break
        if best is None:
            best = [w, mu, var, lower, converged, n_iter]
        else:
            better = lower > best[3]
            for slot, new in zip(best, (w, mu, var, lower, converged, n_iter), strict=True):
                slot[better] = new[better]
    return best


def _total_log_likelihood(pts: WeightedPoints, w, mu, var, chunk: int = 256) -> np.ndarray:
    out = np.empty(pts.positions.shape[0])
    for s in range(0, out.size, chunk):
        sub = pts.subset(slice(s, s + chunk))
        out[s : s + chunk] = (
            _logsumexp(_log_prob(sub, w[s : s + chunk], mu[s : s + chunk], var[s : s + chunk])) * sub.counts
        ).sum(axis=1)
    return out


class GaussianMixture1D:
    """One 1-D Gaussian mixture per column of ``X`` [n_samples, n_series], fitted in one batched EM.

    ``n_components`` is an int or a sequence of candidates; with a sequence each series keeps the
    candidate with the lowest ``criterion`` ("aic" or "bic"; ties go to the smaller K), and
    ``n_components_`` says which. Fitted parameters are padded to the largest K: ``weights_``,
    ``means_``, ``covariances_`` are [n_series, max K], unused components have weight 0 and sort last.
    Components of each series are ordered by mean. ``random_state`` seeds the k-means++ restarts used
    when ``n_init > 1``; the first start is always the deterministic quantile start.
    """

    def __init__(
        self,
        n_components: int | Sequence[int] = 1,
        *,
        criterion: str = "aic",
        tol: float = 1e-3,
        reg_covar: float = 1e-6,
        max_iter: int = 100,
        n_init: int = 1,
        n_bins: int | None = None,
        chunk_size: int = 128,
        random_state: int | None = None,
    ):
        self.n_components = n_components
        self.criterion = criterion
        self.tol = tol
        self.reg_covar = reg_covar
        self.max_iter = max_iter
        self.n_init = n_init
        self.n_bins = n_bins
        self.chunk_size = chunk_size
        self.random_state = random_state

    def _candidates(self) -> list[int]:
        ks = (
            [self.n_components]
            if isinstance(self.n_components, int | np.integer)
            else list(self.n_components)
        )
        if not ks or any(int(k) < 1 for k in ks):
            raise ValueError(
                f"n_components must be a positive int or a non-empty list of them, got {self.n_components!r}"
            )
        if self.criterion not in ("aic", "bic"):
            raise ValueError(f"criterion must be 'aic' or 'bic', got {self.criterion!r}")
        for name in ("tol", "max_iter", "n_init", "chunk_size"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if self.reg_covar < 0:
            raise ValueError(f"reg_covar must be >= 0, got {self.reg_covar!r}")
        if self.n_bins is not None and self.n_bins < 2:
            raise ValueError(f"n_bins must be None or >= 2, got {self.n_bins!r}")
        return sorted({int(k) for k in ks})

    def fit(self, X: np.ndarray) -> GaussianMixture1D:
        X = np.asarray(X)
        if X.ndim == 1:
            X = X[:, None]
        if X.ndim != 2:
            raise ValueError(f"X must be [n_samples, n_series], got shape {X.shape}")
        if not np.isfinite(X).all():
            raise ValueError("X contains NaN or infinite values; drop or impute them before fitting")
        ks = self._candidates()
        n, b = X.shape
        if n < max(ks):
            raise ValueError(f"need n_samples >= n_components ({max(ks)}), got {n}")
        kmax = max(ks)
        rng = np.random.default_rng(self.random_state)
        self.weights_ = np.zeros((b, kmax))
        self.means_ = np.zeros((b, kmax))
        self.covariances_ = np.ones((b, kmax))
        self.n_components_ = np.zeros(b, dtype=np.int64)
        self.converged_ = np.zeros(b, dtype=bool)
        self.n_iter_ = np.zeros(b, dtype=np.int64)
        self.lower_bound_ = np.zeros(b)
        self.log_likelihood_ = np.zeros(b)
        self.criteria_ = np.zeros((b, len(ks)))
        self.candidates_ = np.array(ks)
        for s in range(0, b, self.chunk_size):
            cols = slice(s, min(s + self.chunk_size, b))
            pts = WeightedPoints.from_samples(X[:, cols], self.n_bins)
            fits = []
            for j, k in enumerate(ks):
                w, mu, var, lower, conv, it = _fit_fixed_k(
                    pts,
                    k,
                    tol=self.tol,
                    reg_covar=self.reg_covar,
                    max_iter=self.max_iter,
                    n_init=self.n_init,
                    rng=rng,
                )
                ll = _total_log_likelihood(pts, w, mu, var)
                n_par = 3 * k - 1
                penalty = 2 * n_par if self.criterion == "aic" else n_par * math.log(n)
                self.criteria_[cols, j] = -2 * ll + penalty
                fits.append((w, mu, var, lower, conv, it, ll))
            choice = self.criteria_[cols].argmin(axis=1)
            for j, k in enumerate(ks):
                rows = np.flatnonzero(choice == j)
                if rows.size == 0:
                    continue
                w, mu, var, lower, conv, it, ll = (a[rows] for a in fits[j])
                order = np.argsort(mu, axis=1)
                g = rows + s
                self.weights_[g, :k] = np.take_along_axis(w, order, 1)
                self.means_[g, :k] = np.take_along_axis(mu, order, 1)
                self.covariances_[g, :k] = np.take_along_axis(var, order, 1)
                self.n_components_[g] = k
                self.converged_[g] = conv
                self.n_iter_[g] = it
                self.lower_bound_[g] = lower
                self.log_likelihood_[g] = ll
        if not self.converged_.all():
            warnings.warn(
                f"{int((~self.converged_).sum())} of {b} mixtures did not converge in max_iter="
                f"{self.max_iter} iterations; raise max_iter or tol",
                ConvergenceWarning,
                stacklevel=2,
            )
        self.n_samples_ = n
        return self

    def _check_X(self, X: np.ndarray, series: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        if not hasattr(self, "weights_"):
            raise RuntimeError("GaussianMixture1D is not fitted yet; call fit(X) first")
        X = np.asarray(X, dtype=np.float64)
        if X.ndim == 1:
            X = X[:, None]
        series = np.arange(self.weights_.shape[0]) if series is None else np.asarray(series)
        if X.shape[1] != series.size:
            raise ValueError(f"X has {X.shape[1]} series but {series.size} fitted mixtures were asked for")
        return X, series

    def _log_prob_samples(self, X: np.ndarray, series: np.ndarray | None) -> np.ndarray:
        X, series = self._check_X(X, series)
        pts = WeightedPoints(X.T, np.ones_like(X.T), np.zeros_like(X.T), X.shape[0])
        return _log_prob(pts, self.weights_[series], self.means_[series], self.covariances_[series])

    def score_samples(self, X: np.ndarray, series: np.ndarray | None = None) -> np.ndarray:
        """Log density of each sample under its series' mixture, [n_samples, n_series]."""
        return _logsumexp(self._log_prob_samples(X, series)).T

    def predict_proba(self, X: np.ndarray, series: np.ndarray | None = None) -> np.ndarray:
        """Responsibilities [n_samples, n_series, max K]; ``series`` picks the mixtures for the columns."""
        lp = self._log_prob_samples(X, series)
        return np.exp(lp - _logsumexp(lp)[:, :, None]).transpose(1, 0, 2)

    @classmethod
    def from_sklearn(cls, models: Sequence, X: np.ndarray) -> GaussianMixture1D:
        """Wrap fitted per-series ``sklearn.mixture.GaussianMixture`` models (1-D, fitted on the
        columns of ``X``) in this class's attributes, components ordered by mean: the reference
        implementation plugs into the same downstream code."""
        X = np.asarray(X, dtype=np.float64)
        kmax = max(m.n_components for m in models)
        out = cls(sorted({m.n_components for m in models}))
        b = len(models)
        out.weights_, out.means_, out.covariances_ = (
            np.zeros((b, kmax)),
            np.zeros((b, kmax)),
            np.ones((b, kmax)),
        )
        out.n_components_ = np.array([m.n_components for m in models])
        for i, m in enumerate(models):
            order = np.argsort(m.means_.ravel())
            k = m.n_components
            out.weights_[i, :k] = m.weights_[order]
            out.means_[i, :k] = m.means_.ravel()[order]
            out.covariances_[i, :k] = m.covariances_.ravel()[order]
        out.converged_ = np.array([m.converged_ for m in models])
        out.n_iter_ = np.array([m.n_iter_ for m in models])
        out.lower_bound_ = np.array([m.lower_bound_ for m in models])
        out.log_likelihood_ = np.array([m.score(X[:, [i]]) * X.shape[0] for i, m in enumerate(models)])
        out.n_samples_ = X.shape[0]
        return out

    def aic(self) -> np.ndarray:
        """AIC of the selected mixture per series on the fitted data (scikit-learn's ``aic(X)``)."""
        return -2 * self.log_likelihood_ + 2 * (3 * self.n_components_ - 1)

    def bic(self) -> np.ndarray:
        return -2 * self.log_likelihood_ + (3 * self.n_components_ - 1) * math.log(self.n_samples_)
