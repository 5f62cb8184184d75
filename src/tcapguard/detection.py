"""Find poisoned training samples from attention profiles: the TCAP filter and the BYE baseline.

Both are estimators in the scikit-learn/PyOD mould: ``__init__`` stores options, ``fit(profile)``
returns ``self`` and leaves fitted attributes with a trailing underscore. Both end in the same step:
``scores_`` (higher = more likely poisoned, a posterior in [0, 1]) is compared with ``threshold_``
to give ``labels_``. A filter that finds no trustworthy evidence says so by raising ``threshold_``
to 1.0 (nothing can exceed it) and explaining why in ``decision_``; "nothing flagged" is a normal
answer, since most uploads are clean.

TCAP (arXiv 2601.21692) per head: min-max normalised system share, 1-D Gaussian mixtures with
K = 1..5 chosen by AIC, components split into a minority target and a majority background, a
separation score SS = 1 / (overlap + eps), the top heads vote when a sample's target responsibility
exceeds ``vote_threshold``, and binary Dawid-Skene EM turns votes into a posterior.

Where the paper's split and selection rules fail in practice (see the method notes: template
structure makes clean heads multimodal; a clean upload got two thirds of its samples flagged; a
"target = all but the largest component" rule swallows the clean bulk), the defaults here differ:

- ``split_rule="extreme"``: the target is a run of components at one end (low or high) of the head's
  range with total weight in [min_poison_fraction, max_poison_fraction]; its overlap with the
  background is measured relative to the target's own mass (the share of target mass the background
  could explain), so a tiny component does not win by being tiny. Each head picks its own side, so
  poison may push the system share down in one head and up in another.
- ``head_selection="support"``: a well-separated column (SS >= ``min_separation``) seeds a group,
  which needs ``min_heads`` columns that separate the same samples (AUROC >= ``min_support_auc``);
  those columns vote. A single odd head separates its group nowhere else; without responses, a
  group that more than ``max_footprint`` of all columns separate is taken for template structure.
- Dawid-Skene with a Beta prior on the poison prior, and a final check that declines when the
  estimated poison fraction exceeds ``max_poison_fraction`` or when the posterior is spread rather
  than split (more than ``max_uncertain`` of the samples between 0.1 and 0.9).
- with the upload's responses (``fit(profile, responses)``, the pipeline's default) a verdict must
  also show a backdoor's signature: the flagged samples share one response that the rest of the
  upload does not give. Candidates are tried in order of separation until one does, and all three
  shares of every head are modelled (``feature="auto"``).
- with the upload's queries as well (``fit(profile, responses, queries)``) a verdict whose questions
  set it apart from the rest of the upload is declined (``max_query_auroc``): poison is planted on
  samples drawn without regard to their question, while a clean answer group is one question type.
  In an upload that is one question type this test cannot decline anything, and a minority answer
  that the attention predicts is flagged like a target (measured on one-type cuts of clean uploads:
  ``benchmarks/one_type_uploads.py``); ``target_response_`` names what was taken for the target.
- when no head seeds a backdoor group, the answers seed candidates instead (``answer_seed_auc``):
  every answer that a minority gives, if ``min_heads`` columns separate its givers almost perfectly;
  those columns vote and the verdict passes the same tests. A head's mixture can miss a group that
  the columns separate (the poison a tight spike at one end of a multimodal clean range). Where no
  column separates an answer's givers that well, the giver test (below) may set most of them apart
  from all columns at once; those givers are then the candidate group, and its verdict is judged
  on them with the votes' flags (they are flagged once the answer is the target, whatever the
  votes of the columns that separate them only in part say).
- once a verdict passes with the responses, only the samples that give its target response can be
  poisoned (``restrict_to_target``): a poisoned training sample always gives the attacker's target,
  so among the target's givers poison is the majority and the prior is re-estimated there, and no
  vote makes a sample that answers otherwise poisoned. A giver is also flagged when a classifier of
  all its head shares, trained out of fold on givers against the rest, sets it apart from the rest
  (``giver_alpha``, a conformal p-value): the heads are correlated, so their votes can outvote a
  poisoned giver that a few of them miss; which givers it flags is decided at a false discovery
  rate (Storey's q-values), so a group whose p-values are all small is flagged whole. The same
  test widens the exclusivity test: givers of the group's answer that it sets apart (p-value <=
  ``giver_alpha``) count as the group's; where that is too few and the q-values set apart enough,
  those count instead, unless a peer answer (one whose questions do not set it apart either) has
  most of its givers set apart by them too: then the attention tells answers apart by content,
  as in an upload of one question type, and the q-values are no evidence of a trigger.
The paper's own reading stays available (``split_rule="paper"``, ``head_selection="top"``).

BYE (NeurIPS 2025): per layer a 2-component mixture of the vision-attention entropy; a layer is
sensitive when its component means are more than ``sigma_factor`` x (sigma1 + sigma2) apart; a
2-component mixture of the mean entropy over the sensitive layers; the low-entropy component is
flagged.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from tcapguard.config import StepConfig
from tcapguard.conformal import member_pvalues, storey_qvalues
from tcapguard.mixtures import GaussianMixture1D
from tcapguard.text import normalize
from tcapguard.voting import DawidSkeneResult, dawid_skene, restrict_positives

if TYPE_CHECKING:
    from scipy.sparse import csr_matrix

log = logging.getLogger(__name__)

FEATURES = {"system": 0, "vision": 1, "text": 2}
MIN_SAMPLES = 20
_GRID = 4096


class ProfileLike(Protocol):
    """What the filters read from ``tcapguard.profiling.Profile`` (or any object with these fields)."""

    ids: list[str]
    shares: np.ndarray
    vision_entropy: np.ndarray


def _threshold(scores: np.ndarray, threshold: float) -> np.ndarray:
    """The one thresholding step every filter uses: flagged = score strictly above the threshold."""
    return scores > threshold


class _PoisonFilter:
    """Shared surface: ``fit`` -> ``scores_``, ``threshold_``, ``labels_``, ``n_flagged_``, ``decision_``."""

    threshold: float

    def _finish(self, scores: np.ndarray, *, decline: str | None, decision: str) -> None:
        self.scores_ = scores
        self.threshold_ = 1.0 if decline else float(self.threshold)
        self.labels_ = _threshold(scores, self.threshold_)
        self.n_flagged_ = int(self.labels_.sum())
        self.declined_ = decline is not None
        self.decision_ = decline or decision
        log.info("%s: %s", type(self).__name__, self.decision_)

    def fit_predict(self, X: Any) -> np.ndarray:
        """``fit(X).labels_``."""
        return self.fit(X).labels_  # type: ignore[attr-defined]


def _ids_and(obj: Any, field: str) -> tuple[list[str] | None, np.ndarray]:
    if isinstance(obj, np.ndarray):
        return None, obj
    if not hasattr(obj, field):
        raise TypeError(f"expected a Profile (with .{field}) or a numpy array, got {type(obj).__name__}")
    ids = list(obj.ids) if getattr(obj, "ids", None) is not None else None
    return ids, np.asarray(getattr(obj, field))


def _check_shares(X: Any) -> tuple[list[str] | None, np.ndarray]:
    ids, shares = _ids_and(X, "shares")
    if shares.ndim != 4 or shares.shape[-1] != 3:
        raise ValueError(
            f"shares must be [n_samples, n_layers, n_heads, 3] (system, vision, text), got shape "
            f"{shares.shape}; pass Profile.shares from tcapguard.profiling.load_profile"
        )
    n = shares.shape[0]
    if n < MIN_SAMPLES:
        raise ValueError(f"need at least {MIN_SAMPLES} samples to fit mixtures, got {n}")
    sums = shares.sum(axis=-1, dtype=np.float64)  # NaN/inf anywhere shows up here: one pass, not two
    if not np.isfinite(sums).all():
        where = np.argwhere(~np.isfinite(sums))[0]
        count = int((~np.isfinite(sums)).sum())
        raise ValueError(
            f"shares has NaN/inf values in {count} (sample, layer, head) cells (first at sample {where[0]}, "
            f"layer {where[1]}, head {where[2]}); re-profile those samples or drop them"
        )
    lo, hi = shares.min(), shares.max()
    if lo < -1e-3 or hi > 1 + 1e-3 or np.abs(sums - 1).max() > 1e-2:
        raise ValueError(
            "shares must be attention masses in [0, 1] summing to 1 over (system, vision, text) per "
            f"sample/layer/head; got values in [{lo:.3g}, {hi:.3g}] and sums in "
            f"[{sums.min():.3g}, {sums.max():.3g}]"
        )
    if ids is not None and len(ids) != n:
        raise ValueError(f"profile has {len(ids)} ids but {n} rows of shares")
    return ids, shares


def _check_count(texts: Sequence[str] | None, n: int, what: str) -> None:
    """One text per profiled sample (``what``: "responses" or "queries"), or none at all."""
    if texts is not None and len(texts) != n:
        raise ValueError(f"got {len(texts)} {what} for a profile of {n} samples")


def _normalized_responses(responses: Sequence[str] | None, n: int) -> np.ndarray | None:
    """Responses as :func:`tcapguard.text.normalize` reads them, as an array."""
    _check_count(responses, n, "responses")
    if responses is None:
        return None
    return np.array([normalize(str(r)) for r in responses], dtype=object)


def _commonest(answers: np.ndarray) -> str:
    """The commonest of ``answers`` (ties: the first in sorted order). Unlike the evaluation's
    ``suspected_target`` it counts the empty reading (a punctuation-only answer such as "!!!"): as a
    backdoor's target it must still be found, though no ASR can match it."""
    values, counts = np.unique(answers.astype(str), return_counts=True)
    return str(values[counts.argmax()])


def _response_signature(answers: np.ndarray, flags: np.ndarray) -> tuple[float, float]:
    """(agreement, exclusivity) of the flagged samples' commonest response: the share of flagged
    samples that give it, and the share of all samples giving it that are flagged."""
    givers = answers.astype(str) == _commonest(answers[flags])
    n_flagged_givers = int((givers & flags).sum())
    return n_flagged_givers / int(flags.sum()), n_flagged_givers / int(givers.sum())


PEER_SET_APART = 0.5  # the share of a peer answer's givers that discredits the FDR read (_untrusted)
TRIGGER_WORD_SHARE = 0.8  # query_separability leaves out words in at least this share of the group


def query_words(queries: Sequence[str]) -> csr_matrix | None:
    """The queries as a binary bag of words [N, words] (any script's word characters); None when
    no query has a word (image-only turns), which leaves nothing for the query test to read."""
    from sklearn.feature_extraction.text import CountVectorizer

    vectorizer = CountVectorizer(token_pattern=r"(?u)\b\w+\b", binary=True)
    try:
        return vectorizer.fit_transform([str(q) for q in queries])
    except ValueError:  # empty vocabulary
        return None


def query_separability(words: csr_matrix, member: np.ndarray, random_state: int | None = 0) -> float | None:
    """How well the queries' words tell ``member`` from the rest: 5-fold cross-validated AUROC of a
    logistic regression on ``query_words`` (folds shuffled with ``random_state``, so the upload's
    order does not matter), None when a class has fewer than 2 samples.

    Words in at least ``TRIGGER_WORD_SHARE`` of the members' queries are left out first: a text
    trigger (a word or a sentence, common words included) sits in every poisoned query, and what is
    left of a poisoned group's queries is as varied as anyone's (measured on the tiny worlds: AUROC
    0.39-0.65 for the poison of 24 uploads and for 20 random groups given a trigger phrase of
    common words, 0.91-0.95 for all 432 clean groups that share an answer;
    ``benchmarks/query_groups.py``).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    member = np.asarray(member, dtype=bool)
    folds = min(5, int(member.sum()), int((~member).sum()))
    if folds < 2:
        return None
    share = np.asarray(words[member].mean(axis=0)).ravel()
    x = words[:, np.flatnonzero(share < TRIGGER_WORD_SHARE)]
    if x.shape[1] == 0:
        return 0.5
    cv = StratifiedKFold(folds, shuffle=True, random_state=random_state)
    model = LogisticRegression(max_iter=2000)
    scores = cross_val_predict(model, x, member.astype(int), cv=cv, method="predict_proba")[:, 1]
    return float(roc_auc_score(member, scores))


def _refused_fdr_read(row: dict[str, Any]) -> str:
    """What a candidate's row says of a false discovery rate read that was not taken ("" if none)."""
    if "fdr_untrusted" not in row:
        return ""
    return f"; {row['fdr_set_apart']} at a false discovery rate, not taken: {row['fdr_untrusted']}"


def _uncertain_fraction(posterior: np.ndarray) -> float:
    return float(((posterior > 0.1) & (posterior < 0.9)).mean())


def share_logits(shares: np.ndarray, components: Sequence[int] = (0, 1, 2), eps: float = 1e-7) -> np.ndarray:
    """Each share's log-ratio to the rest of its row, ``log(p_c + eps) - log(1 - p_c + eps)``.

    ``shares`` [..., 3]; returns [..., len(components)] in float32. Attention saturates: a head that
    reads a trigger token may give it 99.9999% of its row where clean samples give 99.9%, which
    the linear share cannot tell apart and the log-ratio puts about 7 apart. ``1 - p_c`` is the sum
    of the other two shares, which keeps its relative precision where ``p_c`` is close to 1;
    ``eps`` (float32's resolution at 1) bounds the range to about +-16.
    """
    out = []
    for c in components:
        rest = shares[..., [o for o in range(3) if o != c]].sum(axis=-1)
        out.append(np.log(shares[..., c] + eps) - np.log(rest + eps))
    return np.stack(out, axis=-1).astype(np.float32)


def _minmax(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column min-max normalisation; constant columns become 0 and are reported."""
    lo, hi = x.min(axis=0), x.max(axis=0)
    span = hi - lo
    flat = span <= 1e-12
    return (x - lo) / np.where(flat, 1.0, span), flat


def _component_densities(gm: GaussianMixture1D, rows: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Weighted density of each component on ``grid``, [len(rows), K, G]."""
    w, mu, var = gm.weights_[rows], gm.means_[rows], gm.covariances_[rows]
    d = grid[None, None, :] - mu[:, :, None]
    return w[:, :, None] * np.exp(-0.5 * d * d / var[:, :, None]) / np.sqrt(2 * np.pi * var[:, :, None])


def split_components(
    gm: GaussianMixture1D,
    *,
    rule: str = "extreme",
    max_fraction: float = 0.3,
    min_fraction: float = 0.005,
    eps: float = 1e-3,
    chunk: int = 128,
) -> dict[str, np.ndarray]:
    """Split each fitted mixture into target and background; return the best split per series.

    Returns ``target`` (bool [B, K], the target components), ``side`` (-1 low end, +1 high end, 0 none),
    ``weight`` (target mass), ``overlap`` and ``separation`` (1 / (overlap + eps); 0 where no split
    qualifies). ``rule="paper"``: target = every component but the heaviest, overlap = integral of
    min(weighted target, weighted background). ``rule="extreme"``: see the module docstring.
    """
    b, kmax = gm.weights_.shape
    ncomp = gm.n_components_
    grid = np.linspace(-0.1, 1.1, _GRID)
    dx = grid[1] - grid[0]
    out = {
        "target": np.zeros((b, kmax), dtype=bool),
        "side": np.zeros(b, dtype=np.int64),
        "weight": np.zeros(b),
        "overlap": np.ones(b),
        "separation": np.zeros(b),
    }
    for s in range(0, b, chunk):
        rows = np.arange(s, min(s + chunk, b))
        dens = _component_densities(gm, rows, grid)
        k = ncomp[rows]
        cands: list[tuple[np.ndarray, np.ndarray]] = []  # (mask [R, K], side [R])
        if rule == "paper":
            heavy = gm.weights_[rows].argmax(axis=1)
            mask = np.arange(kmax)[None, :] < k[:, None]
            mask[np.arange(rows.size), heavy] = False
            cands.append((mask, np.zeros(rows.size, dtype=np.int64)))
        else:
            for i in range(1, kmax):
                idx = np.arange(kmax)[None, :]
                low = (idx < i) & (i < k[:, None])
                high = (idx >= k[:, None] - i) & (idx < k[:, None]) & (i < k[:, None])
                cands.append((low, np.full(rows.size, -1)))
                cands.append((high, np.full(rows.size, 1)))
        valid_comp = np.arange(kmax)[None, :] < k[:, None]
        for mask, side in cands:
            tw = (gm.weights_[rows] * mask).sum(axis=1)
            t = (dens * mask[:, :, None]).sum(axis=1)
            bg = (dens * (valid_comp & ~mask)[:, :, None]).sum(axis=1)
            inter = np.minimum(t, bg).sum(axis=1) * dx
            if rule == "paper":
                ok = mask.any(axis=1)
                ov = inter
            else:
                ok = mask.any(axis=1) & (tw >= min_fraction) & (tw <= max_fraction)
                ov = inter / np.maximum(tw, 1e-12)
            sep = np.where(ok, 1.0 / (ov + eps), 0.0)
            better = sep > out["separation"][rows]
            r = rows[better]
            out["target"][r] = mask[better]
            out["side"][r] = side[better]
            out["weight"][r] = tw[better]
            out["overlap"][r] = ov[better]
            out["separation"][r] = sep[better]
    return out


def _column_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks (1..n, ties broken by order) within each column of ``x`` [n, C]."""
    order = np.argsort(np.ascontiguousarray(x.T), axis=1)
    ranks = np.empty(order.shape, dtype=np.float64)
    np.put_along_axis(ranks, order, np.arange(1, x.shape[0] + 1, dtype=np.float64)[None, :], axis=1)
    return ranks.T


def _two_sided_auroc(ranks: np.ndarray, member: np.ndarray) -> np.ndarray:
    """AUROC of ``member`` vs the rest in every column of ``ranks`` (Mann-Whitney), folded to >= 0.5."""
    n1 = int(member.sum())
    n0 = member.size - n1
    if n1 == 0 or n0 == 0:
        return np.full(ranks.shape[1], 0.5)
    auc = (ranks[member].sum(axis=0) - n1 * (n1 + 1) / 2) / (n1 * n0)
    return np.maximum(auc, 1 - auc)


def _class_conditional_votes(x: np.ndarray, member: np.ndarray, tau: float, reg: float) -> np.ndarray:
    """Per column, P(member | x) from one Gaussian per class (fitted on ``member``) > tau, [N, C]."""
    prior = member.mean()
    out = np.empty(x.shape, dtype=bool)
    for j in range(x.shape[1]):
        a, b = x[member, j], x[~member, j]
        la = -0.5 * (x[:, j] - a.mean()) ** 2 / (a.var() + reg) - 0.5 * np.log(a.var() + reg) + np.log(prior)
        lb = (
            -0.5 * (x[:, j] - b.mean()) ** 2 / (b.var() + reg)
            - 0.5 * np.log(b.var() + reg)
            + np.log1p(-prior)
        )
        out[:, j] = 1 / (1 + np.exp(np.clip(lb - la, -500, 500))) > tau
    return out


class TCAPFilter(_PoisonFilter):
    """Tri-Component Attention Profiling poison filter; see the module docstring for the rules.

    Parameters (defaults measured on the real tiny-world profiles and the synthetic ones in
    ``tcapguard.synthetic``; see the README section on detection):
        n_heads: heads that vote; an int, or "auto" (every supporting head, at most ``max_heads``;
            with ``head_selection="top"``, the largest drop in the sorted separation scores).
        n_layers: only the last ``n_layers`` layers are searched; None searches all of them.
        feature: which share is modelled: "system" (the paper), "vision", "text", "all" (each
            head's three shares are separate columns) or "auto" (default: "all" when ``fit`` gets
            the responses, else "system"). The anomaly shows in different shares per attack and
            world (measured: a SIG backdoor in the vision share, a 5% text trigger in the text
            share); the response test keeps the wider search precise, while without it the wider
            search flagged clean uploads. "all" triples the mixture fits.
        split_rule: "extreme" (default) or "paper".
        scale: "linear" (the paper: the share itself), "logit" (``share_logits``: the log-ratio
            of the share to the rest of the row, where a head that gives 99.9% and one that gives
            99.9999% of its attention to a component differ) or "auto" (default): linear, and when
            that finds no backdoor and ``fit`` has the responses, logit (``scale_`` says which
            decided). Measured on the tiny worlds: auto found six backdoors that linear missed (in
            26 poisoned uploads over four seeds, the fourth held out) and flagged nothing in eight
            clean ones. Without responses it is linear.
        head_selection: "support" (default) or "top" (the paper: top ``n_heads`` by SS).
        max_poison_fraction / min_poison_fraction: bounds on the target weight; the filter also
            declines when Dawid-Skene's poison prior exceeds ``max_poison_fraction``.
        min_separation: SS a head needs to seed a group (SS 20: 5% of the target mass overlaps).
        min_support_auc: AUROC at which another head counts as separating the seed's group.
        min_heads: columns (seed included) that must separate the group; max_footprint: the largest
            share of all head-share columns that may separate it (more is query-template structure;
            used only when ``fit`` gets no responses).
        max_candidates: head columns tried as seeds per scale, and answers the giver test is run on.
        min_response_agreement / min_response_exclusivity: with responses, the flagged samples
            must share one response, and the samples giving it must be mostly flagged.
        max_query_auroc: with queries, the highest ``query_separability`` a verdict may have (None:
            no query test). Above it the flagged samples are one kind of question, not samples
            drawn at random. An attacker who poisons only one question type is declined too; a
            clean group asked in one fixed wording is not caught (its words are in every query of
            the group and are left out, as a trigger's are); groups of one sample pass; with
            ``head_selection="top"`` (the paper's reading) the responses and queries are ignored.
        answer_seed_auc: with responses and queries, when no head-seeded candidate passes: the AUROC
            at which a column confirms the givers of one answer (a share of the upload within the
            poison fraction bounds) as a candidate group; None: no answer seeds. Measured on the
            tiny worlds (``benchmarks/answer_groups.py``): poison groups reach it in 3-12 columns,
            and the only clean groups that do (counting answers such as "one", in 3-8) are one
            question type, which the query test declines; without the queries (or with
            ``max_query_auroc=None``) there are no answer seeds. With the giver test on
            (``giver_alpha``), an answer that fewer columns confirm is a candidate when the test
            sets apart ``min_response_exclusivity`` of its givers (the group: those set apart).
        restrict_to_target: with responses, once a verdict passes: its target response
            (``target_response_``, the flagged samples' commonest) decides who may be poisoned.
            ``restrict_positives`` keeps the voting heads' reliabilities, re-estimates the poison
            prior among the target's givers alone and sets everyone else's posterior to 0; a giver
            whose votes are ambiguous then tips to poisoned, while one whose votes say clean (a
            clean sample that happens to give the target) stays clean. False: the votes'
            posterior as it is.
        giver_alpha: with ``restrict_to_target``: a giver of the target is flagged as well when a
            cross-validated classifier of all its head shares sets it apart from the samples that
            answer otherwise (``conformal.member_pvalues``, kept in ``giver_pvalues_``), at a
            false discovery rate of giver_alpha over the target's givers (Storey's q-value <=
            giver_alpha, kept in ``giver_qvalues_``, with the estimated clean share of the givers
            in ``clean_giver_share_``; its score becomes max(posterior, 1 - q)). The heads vote as
            if independent, so a poisoned giver that few of them catch is outvoted; the classifier
            reads them jointly, and a clean giver, which looks like the reference, has a uniform
            p-value; when the p-values say the givers are nearly all poison, nearly all are
            flagged (measured in two LLaVA Blend 5% worlds: 80 and 87 of 100 poisoned givers at
            p <= 0.01, the rest at 0.01-0.49). In the candidate search a giver counts as set apart
            at p-value <= giver_alpha, or at q-value <= giver_alpha where only that read reaches
            ``min_response_exclusivity`` of the givers and no peer answer discredits it (one
            whose questions do not set it apart, half or more of whose givers the read sets apart
            too: the attention then tells answers apart by content, as in an upload of one
            question type). The exclusivity test counts the givers it sets apart as the
            group's too (a group the votes found only in part: its other givers are poison that
            the votes missed). The givers of a clean answer can be set apart as well (an answer
            follows from its question and image: counting answers are, in the tiny worlds), so
            the query test reads the widened group and declines a question type; the widened group
            must also stay within ``max_poison_fraction``. None: the votes alone.
        giver_error: what ``giver_alpha`` bounds when the target's givers are flagged: "fdr" (the
            false discovery rate over them, above) or "per_giver" (each giver's p-value <=
            giver_alpha, the rule before "fdr": a clean giver is flagged with probability
            giver_alpha, and poisoned givers the classifier sets apart only in part are missed;
            the score of a flagged giver is then max(posterior, 1 - p); the candidate search then
            reads p-values only).
        vote_threshold: responsibility above which a head votes poisoned (the paper's tau).
        prior_strength: Beta(a, b) prior on the poison prior in Dawid-Skene.
        max_uncertain: decline when more than this share of samples has a posterior in (0.1, 0.9).
        threshold: posterior above which a sample is flagged.
        n_components, criterion, reg_covar, tol, max_iter, n_init, n_bins: the mixtures (see
            ``GaussianMixture1D``); n_bins="auto" bins (512 bins) only above 20,000 samples.
    """

    def __init__(
        self,
        n_heads: int | str = "auto",
        n_layers: int | None = None,
        *,
        feature: str = "auto",
        split_rule: str = "extreme",
        scale: str = "auto",
        head_selection: str = "support",
        max_heads: int = 16,
        max_poison_fraction: float = 0.2,
        min_poison_fraction: float = 0.005,
        min_separation: float = 20.0,
        min_support_auc: float = 0.9,
        min_heads: int = 3,
        max_footprint: float = 0.15,
        min_response_agreement: float = 0.8,
        min_response_exclusivity: float = 0.8,
        max_query_auroc: float | None = 0.75,
        max_candidates: int = 32,
        answer_seed_auc: float | None = 0.99,
        restrict_to_target: bool = True,
        giver_alpha: float | None = 0.01,
        giver_error: str = "fdr",
        vote_threshold: float = 0.5,
        prior_strength: tuple[float, float] = (1.0, 4.0),
        max_uncertain: float = 0.05,
        threshold: float = 0.5,
        n_components: tuple[int, ...] = (1, 2, 3, 4, 5),
        criterion: str = "aic",
        reg_covar: float = 1e-6,
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        n_bins: int | str | None = "auto",
        random_state: int | None = 0,
    ):
        self.n_heads = n_heads
        self.n_layers = n_layers
        self.feature = feature
        self.split_rule = split_rule
        self.scale = scale
        self.head_selection = head_selection
        self.max_heads = max_heads
        self.max_poison_fraction = max_poison_fraction
        self.min_poison_fraction = min_poison_fraction
        self.min_separation = min_separation
        self.min_support_auc = min_support_auc
        self.min_heads = min_heads
        self.max_footprint = max_footprint
        self.min_response_agreement = min_response_agreement
        self.min_response_exclusivity = min_response_exclusivity
        self.max_query_auroc = max_query_auroc
        self.max_candidates = max_candidates
        self.answer_seed_auc = answer_seed_auc
        self.restrict_to_target = restrict_to_target
        self.giver_alpha = giver_alpha
        self.giver_error = giver_error
        self.vote_threshold = vote_threshold
        self.prior_strength = prior_strength
        self.max_uncertain = max_uncertain
        self.threshold = threshold
        self.n_components = n_components
        self.criterion = criterion
        self.reg_covar = reg_covar
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.n_bins = n_bins
        self.random_state = random_state

    def _check_params(self, n_layers_total: int) -> None:
        def one_of(name: str, allowed: tuple) -> None:
            if getattr(self, name) not in allowed:
                raise ValueError(f"TCAPFilter.{name} must be one of {allowed}, got {getattr(self, name)!r}")

        one_of("feature", (*FEATURES, "all", "auto"))
        one_of("split_rule", ("extreme", "paper"))
        one_of("giver_error", ("fdr", "per_giver"))
        one_of("scale", ("linear", "logit", "auto"))
        one_of("head_selection", ("support", "top"))
        if not (self.n_heads == "auto" or (isinstance(self.n_heads, int) and self.n_heads >= 1)):
            raise ValueError(f"TCAPFilter.n_heads must be a positive int or 'auto', got {self.n_heads!r}")
        if self.n_layers is not None and not (
            isinstance(self.n_layers, int) and 1 <= self.n_layers <= n_layers_total
        ):
            raise ValueError(
                f"TCAPFilter.n_layers must be None or an int in [1, {n_layers_total}] (the profile "
                f"has {n_layers_total} layers), got {self.n_layers!r}"
            )
        if not 0 < self.min_poison_fraction < self.max_poison_fraction < 1:
            raise ValueError(
                "TCAPFilter needs 0 < min_poison_fraction < max_poison_fraction < 1, got "
                f"{self.min_poison_fraction} and {self.max_poison_fraction}"
            )
        for name in ("vote_threshold", "threshold", "max_uncertain"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"TCAPFilter.{name} must be in [0, 1), got {getattr(self, name)!r}")
        if not 0.5 <= self.min_support_auc <= 1 or not 0 < self.max_footprint <= 1:
            raise ValueError("TCAPFilter needs min_support_auc in [0.5, 1] and max_footprint in (0, 1]")
        for name in ("min_response_agreement", "min_response_exclusivity"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"TCAPFilter.{name} must be in (0, 1], got {getattr(self, name)!r}")
        if self.max_query_auroc is not None and not 0.5 <= self.max_query_auroc <= 1:
            raise ValueError(
                f"TCAPFilter.max_query_auroc must be None or in [0.5, 1], got {self.max_query_auroc!r}"
            )
        if self.answer_seed_auc is not None and not 0.5 <= self.answer_seed_auc <= 1:
            raise ValueError(
                f"TCAPFilter.answer_seed_auc must be None or in [0.5, 1], got {self.answer_seed_auc!r}"
            )
        if self.giver_alpha is not None and not 0 < self.giver_alpha < 0.5:
            raise ValueError(f"TCAPFilter.giver_alpha must be None or in (0, 0.5), got {self.giver_alpha!r}")
        if self.min_heads < 1 or self.max_heads < 1 or self.max_candidates < 1:
            raise ValueError("TCAPFilter.min_heads, max_heads and max_candidates must be >= 1")

    def fit(
        self,
        X: ProfileLike | np.ndarray,
        responses: Sequence[str] | None = None,
        queries: Sequence[str] | None = None,
    ) -> TCAPFilter:
        """Fit on a Profile or a shares array [N, L, H, 3]; returns self.

        ``responses`` (the training responses, in profile order) switch the test that tells a
        backdoor group from clean structure: a backdoor maps its samples to the attacker's one
        target, so the flagged samples must agree on one response that the rest of the upload
        does not give (``_implausible``), while a group of clean samples (a question type, a query
        template) answers variously or shares its answer with similar samples outside it. Without
        them the footprint rule (``max_footprint``) decides. ``queries`` (the user turns, in
        profile order) add the question test (``max_query_auroc``), which catches a clean answer
        that only one question type gives.
        """
        self.ids_, shares = _check_shares(X)
        self._columns = shares.reshape(shares.shape[0], -1)  # what the giver test reads
        self._tested: dict[bytes, np.ndarray] = {}  # its p-values, by group of givers
        self._peers: dict[str, float | None] = {}  # the FDR read's share of each peer answer (_untrusted)
        answers = _normalized_responses(responses, shares.shape[0])
        _check_count(queries, shares.shape[0], "queries")
        reads_texts = self.head_selection == "support"  # the paper's reading ("top") ignores the texts
        test_queries = queries is not None and self.max_query_auroc is not None and reads_texts
        words = query_words(queries) if test_queries else None
        n, n_layers, n_heads, _ = shares.shape
        self._check_params(n_layers)
        first = n_layers - (self.n_layers or n_layers)
        feature = ("all" if answers is not None else "system") if self.feature == "auto" else self.feature
        modelled = list(FEATURES) if feature == "all" else [feature]
        self.features_ = modelled
        m = len(modelled)
        picked = [FEATURES[f] for f in modelled]
        self.layers_searched_ = (first, n_layers)
        self.candidates_: list[dict] = []
        # "auto": the linear share first, the log-ratio scale only when that finds no backdoor and
        # the responses can vouch for a verdict (each try's candidates stay in candidates_)
        scales = (
            [self.scale] if self.scale != "auto" else ["linear"] + (["logit"] if answers is not None else [])
        )
        # the footprint ranks come from the raw shares of every layer: one computation for all scales
        footprint = self._footprint_ranks(shares) if self.head_selection == "support" else None
        for scale in scales:
            search = self._search(shares, first, picked, answers, words, scale, footprint)
            if search["ds"] is not None and search["decline"] is None:
                break
        else:  # the query test is what declines a clean answer group, so answer seeds need the queries
            if answers is not None and words is not None and self.answer_seed_auc is not None:
                found = self._answer_seeds(search["values"], scale, footprint, answers, words)
                search.update(zip(("sel", "votes", "ds", "decline", "target"), found, strict=True))
        self.target_response_ = None
        self.giver_pvalues_ = np.full(n, np.nan)
        self.giver_qvalues_ = np.full(n, np.nan)
        self.clean_giver_share_: float | None = None
        if reads_texts and answers is not None and search["ds"] is not None and search["decline"] is None:
            # an answer seed's answer is its hypothesis (a giver-test seed may pass with no vote)
            self.target_response_ = search["target"]
            if self.target_response_ is None:
                self.target_response_ = _commonest(
                    answers[_threshold(search["ds"].posterior, self.threshold)]
                )
            if self.restrict_to_target:
                eligible = answers == self.target_response_
                search["ds"] = restrict_positives(search["ds"], search["votes"], eligible)
                self.giver_pvalues_ = self._giver_pvalues(eligible)
                self.giver_qvalues_, self.clean_giver_share_ = self._giver_qvalues(eligible)
        del self._columns, self._tested, self._peers  # the fitted filter need not keep the shares
        self.scale_ = scale
        values, gm, split, sep = search["values"], search["gm"], search["split"], search["sep"]
        sel, votes, ds, decline = search["sel"], search["votes"], search["ds"], search["decline"]
        self.n_unconverged_ = int((~gm.converged_).sum())
        self.head_scores_ = np.zeros((n_layers, n_heads))
        self.head_scores_[first:] = sep.reshape(-1, n_heads, m).max(axis=2)
        self.heads_ = [(int(first + i // (n_heads * m)), int(i // m % n_heads), float(sep[i])) for i in sel]
        self.head_features_ = [modelled[i % m] for i in sel]
        self.mixtures_ = [
            {
                "feature": modelled[i % m],
                "n_components": int(gm.n_components_[i]),
                "weights": gm.weights_[i, : gm.n_components_[i]].tolist(),
                "means": gm.means_[i, : gm.n_components_[i]].tolist(),
                "covariances": gm.covariances_[i, : gm.n_components_[i]].tolist(),
                "target": split["target"][i, : gm.n_components_[i]].tolist(),
                "side": int(split["side"][i]),
            }
            for i in sel
        ]
        self.head_values_ = values[:, sel].astype(np.float32)
        self.votes_ = votes

        if ds is None:
            self.head_reliability_ = {"sensitivity": np.zeros(0), "specificity": np.zeros(0)}
            self.poison_prior_ = 0.0
            self.uncertain_fraction_ = 0.0
            self.n_flagged_by_giver_test_ = 0
            self._finish(np.zeros(n), decline=decline or "declined: no head selected", decision="")
            return self
        self.dawid_skene_ = ds
        self.head_reliability_ = {"sensitivity": ds.sensitivity, "specificity": ds.specificity}
        self.poison_prior_ = ds.prior
        self.uncertain_fraction_ = _uncertain_fraction(ds.posterior)
        # the target's givers are flagged at a false discovery rate over them (or per giver); the
        # candidate search reads the per-giver rule first and this one only where no peer answer
        # shows it to set clean answers apart (_set_apart)
        error = self.giver_qvalues_ if self.giver_error == "fdr" else self.giver_pvalues_
        set_apart = error <= (self.giver_alpha or 0)  # NaN (no target, or not a giver) compares False
        scores = np.where(set_apart, np.maximum(ds.posterior, 1 - error), ds.posterior)
        by_votes = _threshold(ds.posterior, self.threshold)
        flagged = _threshold(scores, self.threshold)
        self.n_flagged_by_giver_test_ = int((flagged & ~by_votes).sum())  # 0 when declined: no target
        self._finish(
            scores,
            decline=decline,
            decision=f"{int(flagged.sum())} of {n} samples flagged: {int(by_votes.sum())} by the votes of "
            f"{sel.size} head(s) (poison prior {ds.prior:.2%})"
            + (
                f", {self.n_flagged_by_giver_test_} more by the giver test (its p-values put the clean "
                f"share of the target's givers at {self.clean_giver_share_:.0%})"
                if set_apart.any()
                else ""
            )
            + (f"; target response {self.target_response_!r}" if self.target_response_ is not None else ""),
        )
        return self

    def _footprint_ranks(self, shares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A seeded subsample of at most 5,000 samples and the ranks of every head-share column (all
        layers and shares) within it: what a candidate group's support and footprint are read from."""
        n = shares.shape[0]
        rng = np.random.default_rng(self.random_state)
        sub = np.sort(rng.choice(n, size=min(n, 5000), replace=False))
        return sub, _column_ranks(shares.reshape(n, -1)[sub])

    def _search(
        self,
        shares: np.ndarray,
        first: int,
        picked: list[int],
        answers: np.ndarray | None,
        words: csr_matrix | None,
        scale: str,
        footprint: tuple[np.ndarray, np.ndarray] | None,
    ) -> dict[str, Any]:
        """Mixtures, splits and head selection on the shares of layers ``first:`` at one ``scale``."""
        n = shares.shape[0]
        searched = shares[:, first:]
        feat = searched[..., picked] if scale == "linear" else share_logits(searched, picked)
        feat = feat.reshape(n, -1).astype(np.float32)  # columns in (layer, head, share) order
        values, flat = _minmax(feat)
        n_bins = (512 if n > 20000 else None) if self.n_bins == "auto" else self.n_bins
        ks = tuple(k for k in self.n_components if k <= n)
        gm = self._fit_mixtures(values, ks, n_bins)
        split = split_components(
            gm,
            rule=self.split_rule,
            max_fraction=self.max_poison_fraction,
            min_fraction=self.min_poison_fraction,
        )
        sep = split["separation"]
        sep[flat] = 0.0
        order = np.argsort(-sep, kind="stable")
        decline = None
        ds: DawidSkeneResult | None = None
        if self.head_selection == "top":
            sel = order[: self._max_voters()]
            sel = sel[sep[sel] > 0]
            if self.n_heads == "auto" and sel.size > 1:
                logs = np.log(sep[sel])
                sel = sel[: int(np.argmax(logs[:-1] - logs[1:])) + 1]
            votes = self._target_responsibility(gm, values, sel, split["target"]) > self.vote_threshold
            self.head_support_ = np.ones(sel.size)
            if sel.size == 0:
                decline = "declined: no head has a target/background split"
            else:
                ds = self._aggregate(votes)
                decline = self._implausible(ds, None)  # the paper's reading: no text tests
                decline = decline and f"declined: {decline}"
        else:
            tried = len(self.candidates_)
            sel, votes, ds, decline = self._seed_and_support(
                gm, values, footprint, split, order, answers, words
            )
            for row in self.candidates_[tried:]:
                row["scale"] = scale
        return {
            "values": values,
            "gm": gm,
            "split": split,
            "sep": sep,
            "sel": sel,
            "votes": votes,
            "ds": ds,
            "decline": decline,
            "target": None,  # the target response, where the search seeds by one (_answer_seeds)
        }

    def _max_voters(self) -> int:
        """How many columns may vote: ``n_heads``, or ``max_heads`` when it is "auto"."""
        return self.max_heads if self.n_heads == "auto" else self.n_heads

    def _aggregate(self, votes: np.ndarray) -> DawidSkeneResult:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return dawid_skene(votes, prior_strength=self.prior_strength)

    @property
    def _giver_test_on(self) -> bool:
        return self.giver_alpha is not None and self.restrict_to_target

    def _giver_pvalues(self, givers: np.ndarray) -> np.ndarray:
        """The giver test's p-values for ``givers`` (``conformal.member_pvalues`` on every
        head-share column); NaN for everyone else, and for all when the test is off."""
        if not self._giver_test_on:
            return np.full(givers.size, np.nan)
        key = np.packbits(givers).tobytes()  # candidates often share one answer: test it once
        if key not in self._tested:
            self._tested[key] = member_pvalues(self._columns, givers, random_state=self.random_state)
        return self._tested[key]

    def _set_apart(
        self, givers: np.ndarray, answers: np.ndarray, words: csr_matrix | None, row: dict[str, Any]
    ) -> np.ndarray:
        """The givers the giver test sets apart in the candidate search (none when it is off).

        Per giver (p-value <= ``giver_alpha``) first. Where that leaves the group under
        ``min_response_exclusivity`` and the false discovery rate read (``giver_error="fdr"``,
        q-value <= ``giver_alpha``) reaches it, that read is taken unless a peer answer shows it
        setting clean answers apart in this upload (``_untrusted``, which needs the queries):
        read at a false discovery rate, a clean answer whose givers all look a little alike is
        set apart whole. ``row`` gets which read decided, or why the second was not taken.
        """
        alpha = self.giver_alpha or 0
        per_giver = self._giver_pvalues(givers) <= alpha  # NaN (not tested) compares False
        bar = self.min_response_exclusivity * givers.sum()
        fdr_allowed = self._giver_test_on and self.giver_error == "fdr" and words is not None
        if not fdr_allowed or per_giver.sum() >= bar:
            return per_giver
        at_fdr = self._giver_qvalues(givers)[0] <= alpha
        if at_fdr.sum() < bar:
            return per_giver
        row["fdr_set_apart"] = int(at_fdr.sum())
        why = self._untrusted(givers, answers, words)
        if why:
            row["fdr_untrusted"] = why
            return per_giver
        row["giver_read"] = "fdr"
        return at_fdr

    def _untrusted(self, givers: np.ndarray, answers: np.ndarray, words: csr_matrix) -> str | None:
        """Why the false discovery rate read of ``givers`` is not trusted in this upload, or None.

        A peer is another answer that ``min_poison_fraction`` of the upload gives (the
        ``max_candidates`` commonest) and whose questions do not set its givers apart
        (``query_separability`` <= ``max_query_auroc``), as a backdoor's do not. A peer's givers
        are clean, so the read should set apart almost none of them; if it sets apart most of a
        peer's (``PEER_SET_APART``), the attention tells this upload's answers apart by content
        (measured on uploads cut to one question type: 30-100% of the givers of nearly every
        colour, shape and count answer), and a group it sets apart is no evidence of a trigger.
        In an upload of many question types every clean answer is one type: there are no peers.
        """
        alpha = self.giver_alpha or 0
        names, counts = np.unique(answers[~givers].astype(str), return_counts=True)
        common = (counts >= max(2, self.min_poison_fraction * answers.size)) & (names != "")
        names, counts = names[common], counts[common]
        for name in names[np.argsort(-counts, kind="stable")][: self.max_candidates]:
            peer = answers == name
            if name not in self._peers:
                auroc = query_separability(words, peer, self.random_state)
                # words are read only while the query test is on, so max_query_auroc is set here
                is_peer = auroc is not None and auroc <= (self.max_query_auroc or 0)
                # only a peer asks the giver test (an answer its questions set apart is not one)
                self._peers[name] = (
                    float((self._giver_qvalues(peer)[0][peer] <= alpha).mean()) if is_peer else None
                )
            share = self._peers[name]
            if share is not None and share >= PEER_SET_APART:
                return (
                    f"it sets apart {share:.0%} of the {int(peer.sum())} givers of {str(name)!r} too, whose "
                    "questions do not set them apart either"
                )
        return None

    def _giver_qvalues(self, givers: np.ndarray) -> tuple[np.ndarray, float | None]:
        """Storey's q-values of the giver test's p-values over ``givers`` (NaN for everyone else)
        and the estimated clean share of them (None when nothing was tested)."""
        pvalues = self._giver_pvalues(givers)
        qvalues = np.full(givers.size, np.nan)
        tested = np.flatnonzero(np.isfinite(pvalues) & givers)
        if tested.size == 0:
            return qvalues, None
        qvalues[tested], share = storey_qvalues(pvalues[tested])
        return qvalues, share

    def _implausible(
        self,
        ds: DawidSkeneResult,
        answers: np.ndarray | None,
        words: csr_matrix | None = None,
        measured: dict[str, Any] | None = None,
        set_apart: np.ndarray | None = None,
    ) -> str | None:
        """Why the aggregated verdict is not a backdoor group (None when it may be one).

        Poison is a minority with a split posterior; with the responses, a backdoor also shows
        its signature: the flagged samples give one answer (``min_response_agreement``) that
        almost no one else in the upload gives (``min_response_exclusivity``). A clean group that
        shares an answer (counting questions about two shapes: "two") fails the second test, since
        the same answer is common outside it. With the queries' ``words``, a group that its
        questions set apart (``max_query_auroc``) is a question type, not poison. The figures
        the tests read are written into ``measured`` (a candidate's row). ``set_apart``: samples
        flagged beside the posterior's (a giver-test seed's givers that the test sets apart).
        """
        measured = {} if measured is None else measured
        flags = _threshold(ds.posterior, self.threshold)
        if set_apart is not None:
            flags = flags | set_apart
        if answers is not None and flags.any():
            measured["response_agreement"], measured["response_exclusivity"] = _response_signature(
                answers, flags
            )
        if ds.prior > self.max_poison_fraction:
            return (
                f"Dawid-Skene puts {ds.prior:.1%} of samples in the poison class "
                f"(max_poison_fraction={self.max_poison_fraction})"
            )
        uncertain = _uncertain_fraction(ds.posterior)
        if uncertain > self.max_uncertain:
            return (
                f"posterior spread, {uncertain:.1%} of samples between 0.1 and 0.9 "
                f"(max_uncertain={self.max_uncertain})"
            )
        if not flags.any():
            return "no sample above the threshold"
        if answers is not None:
            agreement, exclusivity = measured["response_agreement"], measured["response_exclusivity"]
            if agreement < self.min_response_agreement:
                return (
                    f"flagged samples do not agree on one response ({agreement:.0%} give the "
                    f"commonest; min_response_agreement={self.min_response_agreement})"
                )
            if exclusivity < self.min_response_exclusivity:
                givers = answers == _commonest(answers[flags])
                apart = self._set_apart(givers, answers, words, measured)
                widened = int(((flags | apart) & givers).sum()) / int(givers.sum())
                tested = self._giver_test_on
                if tested:
                    measured["giver_exclusivity"] = widened
                if widened < self.min_response_exclusivity:
                    return (
                        f"their response is common outside them (only {exclusivity:.0%} of the samples "
                        f"giving it are flagged"
                        + (f", {widened:.0%} with those the giver test sets apart" if tested else "")
                        + _refused_fdr_read(measured)
                        + f"; min_response_exclusivity={self.min_response_exclusivity})"
                    )
                flags = flags | apart  # what would be flagged: the size bound and the query test read it
                if flags.mean() > self.max_poison_fraction:
                    return (
                        f"with the givers the giver test sets apart the group is {flags.mean():.1%} of the "
                        f"upload (max_poison_fraction={self.max_poison_fraction})"
                    )
        if words is not None:
            auroc = query_separability(words, flags, self.random_state)
            measured["query_auroc"] = auroc
            if auroc is not None and auroc > self.max_query_auroc:
                return (
                    f"their questions set them apart from the rest of the upload (query AUROC "
                    f"{auroc:.2f}; max_query_auroc={self.max_query_auroc}): one question type, "
                    "not samples drawn at random"
                )
        return None

    def _fit_mixtures(self, values: np.ndarray, ks: tuple[int, ...], n_bins: int | None) -> GaussianMixture1D:
        """One mixture per head column, K chosen by ``criterion`` (a subclass may swap in a reference)."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # unconverged heads are counted in n_unconverged_
            return GaussianMixture1D(
                ks,
                criterion=self.criterion,
                tol=self.tol,
                reg_covar=self.reg_covar,
                max_iter=self.max_iter,
                n_init=self.n_init,
                n_bins=n_bins,
                random_state=self.random_state,
            ).fit(values)

    def _seed_and_support(
        self,
        gm: GaussianMixture1D,
        values: np.ndarray,
        footprint: tuple[np.ndarray, np.ndarray],
        split: dict,
        order: np.ndarray,
        answers: np.ndarray | None = None,
        words: csr_matrix | None = None,
    ) -> tuple[np.ndarray, np.ndarray, DawidSkeneResult | None, str | None]:
        """Seed: the best-separated head whose target group other heads also separate, but not most.

        Query-template structure moves the attention of nearly every head, so a template group is
        separable almost everywhere; a single odd head separates its group nowhere else; the
        backdoor sits in between. Voters: the seed (its mixture) and the supporting heads (one
        Gaussian per class, fitted on the seed's group). Candidates are tried in order of
        separation; with responses the first whose aggregated verdict passes ``_implausible`` wins,
        without them the first that passes the support and footprint tests decides. Every
        candidate's outcome is kept in ``candidates_``.
        """
        n, c = values.shape
        sep = split["separation"]
        cand = order[: self.max_candidates]
        cand = cand[sep[cand] >= self.min_separation]
        resp = self._target_responsibility(gm, values, cand, split["target"])
        self.head_support_ = np.zeros(0)
        for j, i in enumerate(cand):
            group = resp[:, j] > self.vote_threshold
            auc, auc_all = self._group_aurocs(footprint, group, c)
            support = np.flatnonzero(auc >= self.min_support_auc)
            row: dict[str, Any] = {
                "head": int(i),
                "separation": float(sep[i]),
                "n_target": int(group.sum()),
                "support": int(support.size),
                "footprint": float((auc_all >= self.min_support_auc).mean()),
            }
            self.candidates_.append(row)
            if support.size < self.min_heads:
                row["rejected"] = (
                    f"only {support.size} head(s) separate its group (min_heads={self.min_heads})"
                )
                continue
            if answers is None and row["footprint"] > self.max_footprint:
                row["rejected"] = (
                    f"{row['footprint']:.0%} of all head-shares separate its group, query-template "
                    f"structure (max_footprint={self.max_footprint})"
                )
                continue
            others = support[support != i]
            others = others[np.argsort(-auc[others], kind="stable")]
            others = others[: self._max_voters() - 1]
            sel = np.concatenate([[i], others]).astype(np.int64)
            votes = np.concatenate(
                [
                    group[:, None],
                    _class_conditional_votes(values[:, others], group, self.vote_threshold, self.reg_covar),
                ],
                axis=1,
            )
            ds = self._verdict(votes, answers, words, row)
            if "rejected" in row:
                if answers is None:  # no independent test of a verdict: do not shop for one that passes
                    break
                continue
            self.head_support_ = np.concatenate([[1.0], auc[others]])
            return sel, votes, ds, None
        empty = np.zeros(0, dtype=np.int64)
        return empty, np.zeros((n, 0), dtype=bool), None, self._decline_reason()

    def _answer_seeds(
        self,
        values: np.ndarray,
        scale: str,
        footprint: tuple[np.ndarray, np.ndarray],
        answers: np.ndarray,
        words: csr_matrix,
    ) -> tuple[np.ndarray, np.ndarray, DawidSkeneResult | None, str | None, str | None]:
        """Candidates seeded by the answers: the givers of each answer that a minority gives, if
        ``min_heads`` columns separate them at AUROC >= ``answer_seed_auc``; those columns vote (one
        Gaussian per class on ``values``, the last ``scale`` searched), most-confirmed answer first,
        and the first verdict that passes ``_implausible`` wins. A backdoor maps its samples to one
        answer, so its group is among these even where no head's mixture isolates it. With the
        giver test on, an answer that too few columns confirm is seeded by the givers that the test
        sets apart, if they are ``min_response_exclusivity`` of its givers; the columns that
        separate them best vote. Faint poison that no single column separates well is set apart
        by all columns read jointly. Returns the columns, votes, verdict and decline reason, and
        the accepted answer (the target)."""
        n, c = values.shape
        names, counts = np.unique(answers.astype(str), return_counts=True)
        minority = (counts >= max(2, self.min_poison_fraction * n)) & (counts <= self.max_poison_fraction * n)
        minority &= names != ""  # an empty response is no target
        rows = []
        for answer in names[minority]:
            group = answers == answer
            auc = self._group_aurocs(footprint, group, c)[0]
            support = np.flatnonzero(auc >= self.answer_seed_auc)
            rows.append((support.size, answer, group, auc, support))
        rows.sort(key=lambda r: -r[0])  # stable: equal support keeps the answers' sorted order
        # the giver test costs a few seconds at 100k samples: the unconfirmed answers that the
        # columns come closest to confirming ask it first, at most max_candidates of them
        confirmed = [r for r in rows if r[0] >= self.min_heads]
        unconfirmed = sorted((r for r in rows if r[0] < self.min_heads), key=lambda r: -r[3].max())
        n_tests = 0
        for n_support, answer, givers, auc, support in confirmed + unconfirmed:
            row: dict[str, Any] = {
                "answer": str(answer),
                "n_target": int(givers.sum()),
                "support": n_support,
                "scale": scale,
            }
            self.candidates_.append(row)
            group, eligible = givers, None
            if n_support < self.min_heads:
                reason = (
                    f"only {n_support} column(s) separate its givers at AUROC >= {self.answer_seed_auc} "
                    f"(min_heads={self.min_heads})"
                )
                if not self._giver_test_on or n_tests == self.max_candidates:
                    row["rejected"] = reason
                    continue
                n_tests += 1
                # no column confirms the givers, but all columns read jointly may: the givers that
                # the giver test sets apart seed the group, and the columns that best separate them vote
                group, eligible = self._set_apart(givers, answers, words, row), givers
                row["seed"] = "giver test"
                row["n_set_apart"] = int(group.sum())
                if group.sum() < self.min_response_exclusivity * givers.sum():
                    row["rejected"] = (
                        f"{reason}, and the giver test sets apart only {group.sum()} of its "
                        f"{givers.sum()} givers{_refused_fdr_read(row)} "
                        f"(min_response_exclusivity={self.min_response_exclusivity})"
                    )
                    continue
                auc = self._group_aurocs(footprint, group, c)[0]
                support = np.arange(c)
            sel = support[np.argsort(-auc[support], kind="stable")][: self._max_voters()]
            votes = _class_conditional_votes(values[:, sel], group, self.vote_threshold, self.reg_covar)
            # a giver-test group is read by columns that separate it only in part, whose votes
            # alone would also flag samples that answer otherwise: the answer is the hypothesis
            # here, so the verdict is read among its givers (as restrict_to_target does after it)
            ds = self._verdict(votes, answers, words, row, eligible, group)
            if "rejected" not in row:
                self.head_support_ = auc[sel]
                return sel.astype(np.int64), votes, ds, None, str(answer)
        empty = np.zeros(0, dtype=np.int64)
        return empty, np.zeros((n, 0), dtype=bool), None, self._decline_reason(), None

    def _group_aurocs(
        self, footprint: tuple[np.ndarray, np.ndarray], group: np.ndarray, n_modelled: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(AUROC of ``group`` in each modelled column, in every head-share column of every layer),
        read on the footprint subsample."""
        sub, ranks = footprint
        auc_all = _two_sided_auroc(ranks, group[sub])
        if len(self.features_) == 3:  # the modelled columns: every share of the searched (last) layers
            return auc_all[-n_modelled:], auc_all
        return auc_all.reshape(-1, 3)[-n_modelled:, FEATURES[self.features_[0]]], auc_all

    def _verdict(
        self,
        votes: np.ndarray,
        answers: np.ndarray | None,
        words: csr_matrix | None,
        row: dict[str, Any],
        eligible: np.ndarray | None = None,
        set_apart: np.ndarray | None = None,
    ) -> DawidSkeneResult:
        """Dawid-Skene on a candidate's votes (only the ``eligible`` samples positive, if given);
        ``row`` gets its figures and "accepted" or "rejected". With ``eligible`` (the givers of a
        giver-test seed's answer), the givers the test sets apart (``set_apart``) are judged with
        the flagged samples: ``fit`` flags them whatever the votes say once the answer is the target."""
        ds = self._aggregate(votes)
        if eligible is not None:
            ds = restrict_positives(ds, votes, eligible)
        row["n_flagged"] = int(_threshold(ds.posterior, self.threshold).sum())
        reason = self._implausible(ds, answers, words, measured=row, set_apart=set_apart)
        if reason:
            row["rejected"] = reason
        else:
            row["accepted"] = True
        return ds

    def _decline_reason(self) -> str:
        if not self.candidates_:
            return f"declined: no head separates a minority group (SS >= {self.min_separation})"
        tried = [c for c in self.candidates_ if "n_flagged" in c]  # reached a verdict
        example = (tried or self.candidates_)[0]
        seed = f"head-column {example['head']}" if "head" in example else f"answer {example['answer']!r}"
        # one count per test: the reason up to its figures in brackets, its numbers as "#"
        tally = Counter(re.sub(r"\d[\d.]*%?", "#", c["rejected"].split(" (")[0]) for c in self.candidates_)
        seeds = f"heads with SS >= {self.min_separation}"
        if any("answer" in c for c in self.candidates_):
            seeds += f", answers that columns separate at AUROC >= {self.answer_seed_auc}"
            if any("seed" in c for c in self.candidates_):
                seeds += " or whose givers the giver test sets apart"
        return (
            f"declined: none of {len(self.candidates_)} candidate group(s) ({seeds}) looks like a "
            f"backdoor ({len(tried)} reached a verdict; each reason is in candidates_); e.g. the group "
            f"of {seed} ({example['n_target']} samples): {example['rejected']}. Reasons: "
            + "; ".join(f"{count} x {reason}" for reason, count in tally.most_common())
        )

    @staticmethod
    def _target_responsibility(
        gm: GaussianMixture1D, values: np.ndarray, cols: np.ndarray, target: np.ndarray, chunk: int = 16
    ) -> np.ndarray:
        out = np.zeros((values.shape[0], cols.size))
        for s in range(0, cols.size, chunk):
            c = cols[s : s + chunk]
            resp = gm.predict_proba(values[:, c], series=c)
            out[:, s : s + chunk] = (resp * target[c][None]).sum(axis=2)
        return out


class BYEFilter(_PoisonFilter):
    """The BYE baseline on ``vision_entropy`` [N, L], with TCAPFilter's fitted surface.

    Samples without an image (NaN entropy) get score 0 and are never flagged. When no layer is
    sensitive the filter flags nothing and ``sensitive_layers_`` is empty (``decision_`` says so).
    """

    def __init__(
        self,
        *,
        sigma_factor: float = 2.0,
        threshold: float = 0.5,
        reg_covar: float = 1e-6,
        tol: float = 1e-3,
        max_iter: int = 100,
        n_init: int = 1,
        random_state: int | None = 0,
    ):
        self.sigma_factor = sigma_factor
        self.threshold = threshold
        self.reg_covar = reg_covar
        self.tol = tol
        self.max_iter = max_iter
        self.n_init = n_init
        self.random_state = random_state

    def _mixture(self) -> GaussianMixture1D:
        return GaussianMixture1D(
            2,
            reg_covar=self.reg_covar,
            tol=self.tol,
            max_iter=self.max_iter,
            n_init=self.n_init,
            random_state=self.random_state,
        )

    def fit(self, X: ProfileLike | np.ndarray) -> BYEFilter:
        """Fit on a Profile or a vision-entropy array [N, L]; returns self."""
        self.ids_, ent = _ids_and(X, "vision_entropy")
        if ent.ndim != 2:
            raise ValueError(f"vision_entropy must be [n_samples, n_layers], got shape {ent.shape}")
        if not 0 <= self.threshold < 1 or self.sigma_factor <= 0:
            raise ValueError("BYEFilter needs threshold in [0, 1) and sigma_factor > 0")
        n = ent.shape[0]
        has_image = np.isfinite(ent).all(axis=1)
        if np.isinf(ent).any():
            raise ValueError(
                "vision_entropy has infinite values; entropies are finite (NaN marks 'no image')"
            )
        if has_image.sum() < MIN_SAMPLES:
            raise ValueError(
                f"need at least {MIN_SAMPLES} samples with an image (finite vision_entropy), "
                f"got {int(has_image.sum())} of {n}"
            )
        x = ent[has_image].astype(np.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layers = self._mixture().fit(x)
        sd = np.sqrt(layers.covariances_)
        gap = np.abs(layers.means_[:, 1] - layers.means_[:, 0])
        self.layer_mixtures_ = layers
        self.layer_gaps_ = gap / (sd.sum(axis=1))
        self.sensitive_layers_ = np.flatnonzero(gap > self.sigma_factor * sd.sum(axis=1))
        self.has_image_ = has_image
        scores = np.zeros(n)
        if self.sensitive_layers_.size == 0:
            self.mixture_ = None
            self.mean_entropy_ = None
            self._finish(
                scores,
                decline=f"declined: no layer is sensitive (component means never more than "
                f"{self.sigma_factor} x (sigma1 + sigma2) apart)",
                decision="",
            )
            return self
        mean_ent = x[:, self.sensitive_layers_].mean(axis=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.mixture_ = self._mixture().fit(mean_ent)
        self.mean_entropy_ = np.full(n, np.nan)
        self.mean_entropy_[has_image] = mean_ent
        scores[has_image] = self.mixture_.predict_proba(mean_ent)[:, 0, 0]  # components sorted: 0 = low
        self._finish(
            scores,
            decline=None,
            decision=f"{int(_threshold(scores, self.threshold).sum())} of {n} samples in the "
            f"low-entropy cluster over {self.sensitive_layers_.size} sensitive layer(s)",
        )
        return self


@dataclass
class FilterConfig(StepConfig):
    """Options of the filter stage (``StepConfig``: JSON round trip, unknown keys refused).

    Fields mirror ``TCAPFilter`` (and ``BYEFilter`` for ``method="bye"``); see their docstrings.
    """

    method: str = "tcap"  # "tcap" or "bye"
    n_heads: int | str = "auto"
    n_layers: int | None = None
    feature: str = "auto"
    split_rule: str = "extreme"
    scale: str = "auto"
    head_selection: str = "support"
    max_heads: int = 16
    max_poison_fraction: float = 0.2
    min_poison_fraction: float = 0.005
    min_separation: float = 20.0
    min_support_auc: float = 0.9
    min_heads: int = 3
    max_footprint: float = 0.15
    min_response_agreement: float = 0.8
    min_response_exclusivity: float = 0.8
    max_query_auroc: float | None = 0.75
    answer_seed_auc: float | None = 0.99
    restrict_to_target: bool = True
    giver_alpha: float | None = 0.01
    giver_error: str = "fdr"
    use_responses: bool = True  # pass the upload's responses and queries to fit: README, The filter
    vote_threshold: float = 0.5
    prior_strength: tuple[float, float] = (1.0, 4.0)
    max_uncertain: float = 0.05
    threshold: float = 0.5
    sigma_factor: float = 2.0  # BYE only
    n_init: int = 1
    n_bins: int | str | None = "auto"
    random_state: int | None = 0

    def __post_init__(self) -> None:
        if self.method not in ("tcap", "bye"):
            raise ValueError(f"FilterConfig.method must be 'tcap' or 'bye', got {self.method!r}")
        self.prior_strength = tuple(self.prior_strength)
        if self.method == "tcap":
            self.to_estimator()._check_params(n_layers_total=10**6)

    def to_estimator(self) -> TCAPFilter | BYEFilter:
        """The configured, unfitted filter."""
        if self.method == "bye":
            return BYEFilter(
                sigma_factor=self.sigma_factor,
                threshold=self.threshold,
                n_init=self.n_init,
                random_state=self.random_state,
            )
        opts = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("method", "sigma_factor", "use_responses")
        }
        return TCAPFilter(**opts)

    def fit(
        self,
        profile: ProfileLike,
        responses: Sequence[str] | None = None,
        queries: Sequence[str] | None = None,
    ) -> TCAPFilter | BYEFilter:
        """The configured filter fitted on ``profile``; the upload's ``responses`` and ``queries``
        go to TCAP when ``use_responses`` (and are required then; the queries only while
        ``max_query_auroc`` is set)."""
        estimator = self.to_estimator()
        if isinstance(estimator, BYEFilter):
            return estimator.fit(profile)
        if not self.use_responses:
            log.warning(
                "FilterConfig(use_responses=False): without the responses only the footprint rule "
                "tells a backdoor from clean structure; in 7 of 12 tiny worlds it flagged 267-397 "
                "samples, almost none poisoned (README, The filter)"
            )
            return estimator.fit(profile)
        if responses is None:
            raise ValueError("FilterConfig(use_responses=True) needs the upload's responses")
        if queries is None and self.max_query_auroc is not None:
            raise ValueError(
                "FilterConfig(use_responses=True) needs the upload's responses and queries "
                "(max_query_auroc=None turns the query test off)"
            )
        return estimator.fit(profile, responses=responses, queries=queries)


def find_poisoned_samples(
    profile: ProfileLike | np.ndarray, *, method: str = "tcap", **options: Any
) -> np.ndarray:
    """One call: a bool mask [N] of the samples to drop before fine-tuning again.

    ``method``: "tcap" (``TCAPFilter``, reads ``profile.shares``) or "bye" (``BYEFilter``, reads
    ``profile.vision_entropy``). ``options`` go to the filter's constructor, e.g. ``n_heads=4``,
    ``head_selection="top"``, ``split_rule="paper"`` (allowed values in ``TCAPFilter``'s docstring).
    """
    if method == "tcap":
        return TCAPFilter(**options).fit(profile).labels_
    if method == "bye":
        return BYEFilter(**options).fit(profile).labels_
    raise ValueError(f"method must be 'tcap' or 'bye', got {method!r}")
