"""TCAP fit speed at scale, and agreement with the per-head scikit-learn reference.

    PYTHONPATH=src .venv/bin/python benchmarks/detection_fit.py            # 100k samples x 32 x 32 heads
    PYTHONPATH=src .venv/bin/python benchmarks/detection_fit.py --n 20000  # quicker

1. Speed: ``TCAPFilter().fit`` on a synthetic profile of ``--n`` samples x 32 layers x 32 heads
   (1,024 heads; mixtures binned above 20k samples). The per-head scikit-learn reference
   (``GaussianMixture`` for K = 1..5, AIC) is timed on ``--ref-heads`` heads of the same profile and
   extrapolated linearly to all heads (it would take tens of minutes to run in full). The giver
   test (``conformal.member_pvalues``, which ``fit`` runs only with responses, once a target is
   found) is timed on the same profile's 3,072 head-share columns with the poison as the givers.
2. Agreement: on smaller profiles where both run in full (5,000 samples x 8 x 8 heads, no binning),
   the filter with its batched mixtures and the same filter with scikit-learn's mixtures: chosen K
   per head, the top heads by separation score, and the selected (voting) heads.
Results: a table on stdout and ``benchmarks/results/detection_fit.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
import warnings
from pathlib import Path

import numpy as np
from sklearn.metrics import f1_score, roc_auc_score
from sklearn.mixture import GaussianMixture

from tcapguard.conformal import member_pvalues
from tcapguard.detection import TCAPFilter
from tcapguard.mixtures import GaussianMixture1D
from tcapguard.synthetic import make_profile


def sklearn_mixtures(values: np.ndarray, ks: tuple[int, ...], criterion: str = "aic") -> GaussianMixture1D:
    """The reference: one scikit-learn GaussianMixture per head and K, the lowest AIC kept."""
    best = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for j in range(values.shape[1]):
            col = values[:, [j]]
            fits = [GaussianMixture(k, random_state=0).fit(col) for k in ks]
            best.append(min(fits, key=lambda m, c=col: getattr(m, criterion)(c)))
    return GaussianMixture1D.from_sklearn(best, values)


class ReferenceTCAPFilter(TCAPFilter):
    """TCAPFilter with scikit-learn's per-head mixtures instead of the batched EM."""

    def _fit_mixtures(self, values, ks, n_bins):
        return sklearn_mixtures(values, ks, self.criterion)


def speed(n: int, ref_heads: int) -> dict:
    t0 = time.perf_counter()
    profile = make_profile(n_samples=n, n_layers=32, n_heads=32, rate=0.05, poison_layers=4, seed=0)
    gen = time.perf_counter() - t0
    heads = 32 * 32
    t0 = time.perf_counter()
    filt = TCAPFilter().fit(profile)
    fit = time.perf_counter() - t0
    values = profile.shares[:, :, :, 0].reshape(n, -1).astype(np.float64)
    values = (values - values.min(0)) / (values.max(0) - values.min(0))
    cols = np.linspace(0, heads - 1, ref_heads).astype(int)
    t0 = time.perf_counter()
    GaussianMixture1D((1, 2, 3, 4, 5), n_bins=1024 if n > 20000 else None).fit(values[:, cols])
    ours_sub = time.perf_counter() - t0
    t0 = time.perf_counter()
    sklearn_mixtures(values[:, cols], (1, 2, 3, 4, 5))
    ref_sub = time.perf_counter() - t0
    ref_all = ref_sub / ref_heads * heads
    # the giver test (run only once fit has responses and finds a target): the poison as the givers
    columns = profile.shares.reshape(n, -1)
    t0 = time.perf_counter()
    pvalues = member_pvalues(columns, profile.poisoned)
    giver = time.perf_counter() - t0
    return {
        "n_samples": n,
        "n_heads": heads,
        "generate_s": round(gen, 1),
        "tcap_fit_s": round(fit, 2),
        "ours_mixtures_on_subset_s": round(ours_sub, 3),
        "sklearn_mixtures_on_subset_s": round(ref_sub, 2),
        "subset_heads": ref_heads,
        "sklearn_mixtures_all_heads_extrapolated_s": round(ref_all, 1),
        "speedup_full_fit_vs_sklearn_mixtures_alone": round(ref_all / fit, 1),
        "speedup_mixtures_on_subset": round(ref_sub / ours_sub, 1),
        "f1": round(f1_score(profile.poisoned, filt.labels_), 4),
        "auroc": round(roc_auc_score(profile.poisoned, filt.scores_), 4),
        "n_flagged": filt.n_flagged_,
        "n_poisoned": int(profile.poisoned.sum()),
        "giver_test_s": round(giver, 2),
        "giver_test_columns": int(columns.shape[1]),
        "giver_test_set_apart": round(float((pvalues[profile.poisoned] <= 0.01).mean()), 4),
    }


def agreement(seeds: list[int]) -> list[dict]:
    rows = []
    for seed in seeds:
        for rate in (0.0, 0.05, 0.1):
            p = make_profile(n_samples=5000, rate=rate, seed=seed)
            t0 = time.perf_counter()
            ours = TCAPFilter().fit(p)
            t_ours = time.perf_counter() - t0
            t0 = time.perf_counter()
            ref = ReferenceTCAPFilter().fit(p)
            t_ref = time.perf_counter() - t0
            top = lambda f: set(np.argsort(-f.head_scores_.ravel())[:8].tolist())  # noqa: E731
            rows.append(
                {
                    "seed": seed,
                    "rate": rate,
                    "selected_ours": [h[:2] for h in ours.heads_],
                    "selected_ref": [h[:2] for h in ref.heads_],
                    "same_selected_heads": [h[:2] for h in ours.heads_] == [h[:2] for h in ref.heads_],
                    "top8_overlap": len(top(ours) & top(ref)) / 8,
                    "same_flags": bool((ours.labels_ == ref.labels_).all()),
                    "n_flagged_ours": ours.n_flagged_,
                    "n_flagged_ref": ref.n_flagged_,
                    "fit_s_ours": round(t_ours, 2),
                    "fit_s_ref": round(t_ref, 1),
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--ref-heads", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default="benchmarks/results/detection_fit.json")
    args = parser.parse_args()
    s = speed(args.n, args.ref_heads)
    head = f"{'samples':>8} {'heads':>6} {'TCAP fit s':>10} {'sklearn mix s (extrap.)':>24} {'speedup':>8}"
    print(f"{head} {'F1':>6}")
    print(
        f"{s['n_samples']:>8} {s['n_heads']:>6} {s['tcap_fit_s']:>10} "
        f"{s['sklearn_mixtures_all_heads_extrapolated_s']:>24} "
        f"{s['speedup_full_fit_vs_sklearn_mixtures_alone']:>8} {s['f1']:>6}"
    )
    print(
        f"(sklearn timed on {s['subset_heads']} heads: {s['sklearn_mixtures_on_subset_s']} s, ours on the "
        f"same heads {s['ours_mixtures_on_subset_s']} s; extrapolated linearly to {s['n_heads']} heads)"
    )
    print(
        f"giver test (conformal.member_pvalues) on {s['giver_test_columns']} columns with the "
        f"{s['n_poisoned']} poisoned samples as givers: {s['giver_test_s']} s, "
        f"{s['giver_test_set_apart']:.1%} of them at p <= 0.01"
    )
    rows = agreement(args.seeds)
    print(
        f"\n{'seed':>4} {'rate':>5} {'same heads':>10} {'top8 overlap':>12} {'same flags':>10} "
        f"{'flagged ours/ref':>16} {'fit s ours/ref':>14}"
    )
    for r in rows:
        print(
            f"{r['seed']:>4} {r['rate']:>5} {r['same_selected_heads']!s:>10} {r['top8_overlap']:>12.2f} "
            f"{r['same_flags']!s:>10} {r['n_flagged_ours']:>7}/{r['n_flagged_ref']:<8} "
            f"{r['fit_s_ours']:>6}/{r['fit_s_ref']:<7}"
        )
    out = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "speed": s,
        "agreement": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
