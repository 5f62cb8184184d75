"""What a fitted filter found, for people: PNG plots, a JSON report and a CSV of flagged samples.

Every function takes a fitted ``TCAPFilter`` or ``BYEFilter`` and a destination (local path or
``s3://``), writes one file through ``tcapguard.storage`` (atomically for local paths) and returns
the destination. Plots use matplotlib's Agg backend, so no display is needed.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from tcapguard import __version__
from tcapguard.detection import BYEFilter, TCAPFilter
from tcapguard.storage import write_bytes


def _check_fitted(filt: TCAPFilter | BYEFilter) -> None:
    if not hasattr(filt, "scores_"):
        raise RuntimeError(f"{type(filt).__name__} is not fitted; call fit(profile) before reporting")


def _save(fig, dest: str | Path) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(dest, buf.getvalue())
    return str(dest)


def plot_score_histogram(filt: TCAPFilter | BYEFilter, dest: str | Path) -> str:
    """Histogram of ``scores_`` (log count) with ``threshold_`` marked."""
    _check_fitted(filt)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(filt.scores_, bins=50, range=(0, 1), color="tab:blue", log=True)
    ax.axvline(filt.threshold_, color="tab:red", ls="--", label=f"threshold {filt.threshold_:.2f}")
    ax.set(
        xlabel="poison score (posterior)",
        ylabel="samples",
        title=f"{type(filt).__name__}: {filt.n_flagged_} of {filt.scores_.size} flagged",
    )
    ax.legend()
    return _save(fig, dest)


def plot_separation_heatmap(filt: TCAPFilter, dest: str | Path) -> str:
    """Separation score per layer x head (log scale), the selected heads boxed (the seed in red)."""
    _check_fitted(filt)
    ss = filt.head_scores_
    fig, ax = plt.subplots(figsize=(max(4, ss.shape[1] * 0.35 + 2), max(3, ss.shape[0] * 0.3 + 1.5)))
    im = ax.imshow(np.log10(1 + ss), aspect="auto", cmap="viridis", origin="lower")
    fig.colorbar(im, ax=ax, label="log10(1 + SS)")
    for j, (layer, head, _) in enumerate(filt.heads_):
        ax.add_patch(
            plt.Rectangle(
                (head - 0.5, layer - 0.5), 1, 1, fill=False, lw=2, ec="tab:red" if j == 0 else "white"
            )
        )
    ax.set(xlabel="head", ylabel="layer", title="separation score (boxed: voting heads)")
    return _save(fig, dest)


def plot_head_mixtures(filt: TCAPFilter, dest: str | Path, *, n_top: int = 4) -> str:
    """Histogram of the normalised share of the top voting heads with their AIC-chosen mixtures."""
    _check_fitted(filt)
    heads = filt.heads_[:n_top]
    fig, axes = plt.subplots(1, max(1, len(heads)), figsize=(4 * max(1, len(heads)), 3.2), squeeze=False)
    if not heads:
        axes[0, 0].text(
            0.5, 0.5, "no head selected:\n" + filt.decision_[:80], ha="center", va="center", wrap=True
        )
        axes[0, 0].set_axis_off()
    grid = np.linspace(0, 1, 400)
    for ax, (j, (layer, head, ss)) in zip(axes[0], enumerate(heads), strict=False):
        mix = filt.mixtures_[j]
        ax.hist(filt.head_values_[:, j], bins=80, range=(0, 1), density=True, color="0.75")
        total = np.zeros_like(grid)
        for w, mu, var, is_target in zip(
            mix["weights"], mix["means"], mix["covariances"], mix["target"], strict=True
        ):
            dens = w * np.exp(-0.5 * (grid - mu) ** 2 / var) / np.sqrt(2 * np.pi * var)
            total += dens
            ax.plot(grid, dens, color="tab:red" if is_target else "tab:blue", lw=1)
        ax.plot(grid, total, color="k", lw=1, ls=":")
        ax.set(
            title=f"L{layer} H{head}  K={mix['n_components']}  SS={ss:.0f}",
            xlabel=f"normalised {mix['feature']} share",
        )
    return _save(fig, dest)


def report(filt: TCAPFilter | BYEFilter) -> dict:
    """The report as a dict: parameters, decision, selected heads/layers, reliabilities, counts."""
    _check_fitted(filt)
    params = {
        k: (list(v) if isinstance(v, tuple) else v)
        for k, v in vars(filt).items()
        if not k.endswith("_") and not k.startswith("_")
    }
    out = {
        "filter": type(filt).__name__,
        "tcapguard_version": __version__,
        "params": params,
        "n_samples": int(filt.scores_.size),
        "n_flagged": filt.n_flagged_,
        "threshold": filt.threshold_,
        "declined": filt.declined_,
        "decision": filt.decision_,
    }
    if isinstance(filt, TCAPFilter):
        rel = filt.head_reliability_
        out["heads"] = [
            {
                "layer": lay,
                "head": h,
                "feature": filt.head_features_[j],
                "separation": ss,
                "support_auroc": float(filt.head_support_[j]),
                "sensitivity": float(rel["sensitivity"][j]),
                "specificity": float(rel["specificity"][j]),
                "n_votes": int(filt.votes_[:, j].sum()),
            }
            for j, (lay, h, ss) in enumerate(filt.heads_)
        ]
        out["poison_prior"] = filt.poison_prior_
        out["target_response"] = filt.target_response_
        out["n_flagged_by_giver_test"] = filt.n_flagged_by_giver_test_
        out["clean_giver_share"] = filt.clean_giver_share_
        out["uncertain_fraction"] = filt.uncertain_fraction_
        out["candidates"] = filt.candidates_
        out["n_unconverged_mixtures"] = filt.n_unconverged_
    else:
        out["sensitive_layers"] = filt.sensitive_layers_.tolist()
        out["layer_gaps"] = filt.layer_gaps_.tolist()
    return out


def write_report(filt: TCAPFilter | BYEFilter, dest: str | Path) -> str:
    """``report(filt)`` as JSON at ``dest``."""
    write_bytes(dest, (json.dumps(report(filt), indent=2, default=float) + "\n").encode())
    return str(dest)


def write_flagged_table(filt: TCAPFilter | BYEFilter, dest: str | Path) -> str:
    """CSV of the flagged samples, most suspicious first: id, score (``scores_``: the posterior, or
    1 - q for a giver the giver test flagged), votes (heads voting poison), giver_pvalue and
    giver_qvalue (TCAP with a target response; empty otherwise)."""
    _check_fitted(filt)
    n = filt.scores_.size
    ids = filt.ids_ if filt.ids_ is not None else [str(i) for i in range(n)]
    tcap = isinstance(filt, TCAPFilter)
    votes = filt.votes_.sum(axis=1) if tcap else np.zeros(n, dtype=int)
    pvalues = filt.giver_pvalues_ if tcap else np.full(n, np.nan)
    qvalues = filt.giver_qvalues_ if tcap else np.full(n, np.nan)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["id", "score", "votes", "giver_pvalue", "giver_qvalue"])
    for i in np.flatnonzero(filt.labels_)[np.argsort(-filt.scores_[filt.labels_], kind="stable")]:
        p, q = ("" if np.isnan(v[i]) else f"{v[i]:.6f}" for v in (pvalues, qvalues))
        writer.writerow([ids[i], f"{filt.scores_[i]:.6f}", int(votes[i]), p, q])
    write_bytes(dest, buf.getvalue().encode())
    return str(dest)
