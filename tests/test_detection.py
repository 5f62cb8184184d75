"""TCAP and BYE filters on synthetic profiles with planted poison (tcapguard.synthetic)."""

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score

from tcapguard import detection
from tcapguard.detection import (
    BYEFilter,
    FilterConfig,
    TCAPFilter,
    find_poisoned_samples,
    query_separability,
    query_words,
    share_logits,
)
from tcapguard.detection_report import (
    plot_head_mixtures,
    plot_score_histogram,
    plot_separation_heatmap,
    report,
    write_flagged_table,
    write_report,
)
from tcapguard.evaluation import suspected_target
from tcapguard.synthetic import make_profile
from tcapguard.text import normalize
from tcapguard.world import PHRASINGS


@pytest.fixture(scope="module")
def poisoned():
    return make_profile(rate=0.1, seed=1)


@pytest.fixture(scope="module")
def fitted(poisoned):
    return TCAPFilter().fit(poisoned)


@pytest.mark.parametrize(("rate", "seed"), [(0.01, 1), (0.05, 0), (0.05, 1), (0.1, 0), (0.1, 2)])
def test_tcap_finds_planted_poison(rate, seed):
    p = make_profile(rate=rate, seed=seed)
    f = TCAPFilter().fit(p)
    assert roc_auc_score(p.poisoned, f.scores_) >= 0.95
    assert f1_score(p.poisoned, f.labels_) >= 0.9
    # The seed head is one where the poison was planted.
    assert tuple(f.heads_[0][:2]) in p.poison_heads


def test_tcap_uses_heads_where_poison_goes_down_and_up(fitted, poisoned):
    # The generator pushes the system share down in half of the poison heads and up in the others.
    votes_on_poison = fitted.votes_[poisoned.poisoned].mean(axis=0)
    chosen = [(lay, h) for lay, h, _ in fitted.heads_]
    sides = []
    for j, head in enumerate(chosen):
        if head in poisoned.poison_heads and votes_on_poison[j] > 0.9:
            x = fitted.head_values_[:, j]
            sides.append(np.sign(x[poisoned.poisoned].mean() - x[~poisoned.poisoned].mean()))
    assert {-1.0, 1.0} <= set(sides)


@pytest.mark.parametrize("seed", [0, 1])
def test_tcap_flags_nothing_on_a_clean_upload(seed):
    f = TCAPFilter().fit(make_profile(rate=0.0, seed=seed))
    assert f.n_flagged_ == 0
    assert f.declined_ and f.decision_.startswith("declined")
    assert f.threshold_ == 1.0


def test_paper_rule_is_available_and_flags_template_structure():
    # The paper's reading (target = all but the heaviest component, top heads by SS) on a clean
    # upload with template structure: documents why it is not the default.
    p = make_profile(rate=0.0, seed=0)
    f = TCAPFilter(n_heads=4, n_layers=2, split_rule="paper", head_selection="top").fit(p)
    assert len(f.heads_) == 4
    assert all(lay >= 6 for lay, _, _ in f.heads_)
    assert f.scores_.shape == (2000,)
    # it ignores the responses: no target response, nothing restricted to one
    poisoned = make_profile(rate=0.1, seed=1)
    responses = np.where(poisoned.poisoned, "backdoor attack", "answer").tolist()
    paper = dict(n_heads=4, n_layers=2, split_rule="paper", head_selection="top")
    read = TCAPFilter(**paper).fit(poisoned, responses=responses)
    assert read.target_response_ is None
    unrestricted = TCAPFilter(**paper, restrict_to_target=False).fit(poisoned, responses=responses)
    np.testing.assert_array_equal(read.scores_, unrestricted.scores_)


def test_one_thresholding_step(fitted):
    np.testing.assert_array_equal(fitted.labels_, fitted.scores_ > fitted.threshold_)
    assert fitted.n_flagged_ == fitted.labels_.sum()
    assert fitted.head_scores_.shape == (8, 8)
    assert fitted.votes_.shape == (2000, len(fitted.heads_))
    rel = fitted.head_reliability_
    assert rel["sensitivity"].shape == rel["specificity"].shape == (len(fitted.heads_),)
    assert len(fitted.mixtures_) == len(fitted.head_features_) == len(fitted.heads_)
    assert fitted.features_ == ["system"] and {m["feature"] for m in fitted.mixtures_} == {"system"}


def test_fixed_heads_and_layers(poisoned):
    f = TCAPFilter(n_heads=2, n_layers=3).fit(poisoned)
    assert len(f.heads_) == 2
    assert all(lay >= 5 for lay, _, _ in f.heads_)
    assert (f.head_scores_[:5] == 0).all()


def test_bye_finds_patch_poison_and_declines_on_global_trigger():
    p = make_profile(rate=0.1, seed=0, entropy_effect="down")
    b = BYEFilter().fit(p)
    assert f1_score(p.poisoned, b.labels_) >= 0.95
    assert list(b.sensitive_layers_) == [6, 7]
    np.testing.assert_array_equal(b.labels_, b.scores_ > b.threshold_)
    flat = BYEFilter().fit(make_profile(rate=0.1, seed=0, entropy_effect="none"))
    assert flat.n_flagged_ == 0 and flat.sensitive_layers_.size == 0 and flat.declined_


def test_bye_never_flags_samples_without_image():
    p = make_profile(rate=0.1, seed=0)
    ent = p.vision_entropy.copy()
    ent[np.flatnonzero(p.poisoned)[:5]] = np.nan
    b = BYEFilter().fit(ent)
    assert not b.labels_[np.flatnonzero(p.poisoned)[:5]].any()
    assert b.labels_.sum() == p.poisoned.sum() - 5


@pytest.mark.parametrize(
    ("shares", "match"),
    [
        (np.full((100, 2, 2, 2), 0.5), r"\[n_samples, n_layers, n_heads, 3\]"),
        (np.full((10, 2, 2, 3), 1 / 3), "at least 20 samples"),
        (np.full((100, 2, 2, 3), 0.9), "summing to 1"),
    ],
)
def test_tcap_rejects_bad_shares(shares, match):
    with pytest.raises(ValueError, match=match):
        TCAPFilter().fit(shares)


def test_tcap_names_the_first_nan(poisoned):
    shares = poisoned.shares.copy()
    shares[7, 3, 2, 0] = np.nan
    with pytest.raises(ValueError, match="sample 7, layer 3, head 2"):
        TCAPFilter().fit(shares)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"feature": "audio"}, "feature"),
        ({"n_layers": 9}, "n_layers"),
        ({"n_heads": 0}, "n_heads"),
        ({"min_poison_fraction": 0.5}, "min_poison_fraction"),
        ({"scale": "log"}, "scale"),
        ({"giver_alpha": 0.5}, "giver_alpha"),
        ({"giver_error": "fwer"}, "giver_error"),
    ],
)
def test_tcap_rejects_bad_options(poisoned, kwargs, match):
    with pytest.raises(ValueError, match=match):
        TCAPFilter(**kwargs).fit(poisoned)


def test_find_poisoned_samples_front_door(poisoned, fitted):
    np.testing.assert_array_equal(find_poisoned_samples(poisoned), fitted.labels_)
    assert find_poisoned_samples(poisoned, method="bye").sum() == poisoned.poisoned.sum()
    with pytest.raises(ValueError, match="'tcap' or 'bye'"):
        find_poisoned_samples(poisoned, method="spectral")


def test_filter_config_builds_the_configured_estimator():
    est = FilterConfig(n_heads=6, prior_strength=[1.0, 9.0]).to_estimator()  # a list, as from JSON
    assert isinstance(est, TCAPFilter) and est.n_heads == 6 and est.prior_strength == (1.0, 9.0)
    assert isinstance(FilterConfig(method="bye").to_estimator(), BYEFilter)
    with pytest.raises(ValueError, match="method"):
        FilterConfig(method="pca")
    with pytest.raises(ValueError, match="split_rule"):
        FilterConfig(split_rule="middle")


def test_filter_config_fits_with_the_texts_it_asks_for(poisoned, caplog):
    responses = np.where(poisoned.poisoned, "backdoor attack", "other").tolist()
    queries = [f"question {i}" for i in range(len(responses))]
    with_responses = FilterConfig().fit(poisoned, responses, queries)
    assert with_responses.features_ == ["system", "vision", "text"]  # "auto" saw the responses
    with caplog.at_level(logging.WARNING, logger="tcapguard.detection"):
        assert FilterConfig(use_responses=False).fit(poisoned, responses).features_ == ["system"]
    assert "use_responses=False" in caplog.text  # the footprint rule alone false-flags clean structure
    assert isinstance(FilterConfig(method="bye").fit(poisoned, responses), BYEFilter)
    assert FilterConfig(max_query_auroc=None).fit(poisoned, responses).features_ == [
        "system",
        "vision",
        "text",
    ]
    with pytest.raises(ValueError, match="needs the upload's responses"):
        FilterConfig().fit(poisoned)
    with pytest.raises(ValueError, match="and queries"):
        FilterConfig().fit(poisoned, responses)


def test_reports_and_plots(tmp_path, fitted):
    for fn, name in [
        (plot_score_histogram, "scores.png"),
        (plot_separation_heatmap, "heads.png"),
        (plot_head_mixtures, "mixtures.png"),
    ]:
        out = fn(fitted, tmp_path / name)
        assert Path(out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rep = json.loads(Path(write_report(fitted, tmp_path / "report.json")).read_text())
    assert rep["n_flagged"] == fitted.n_flagged_ and len(rep["heads"]) == len(fitted.heads_)
    assert {"sensitivity", "specificity", "layer", "head", "separation"} <= set(rep["heads"][0])
    rows = Path(write_flagged_table(fitted, tmp_path / "flagged.csv")).read_text().splitlines()
    assert rows[0] == "id,score,votes,giver_pvalue,giver_qvalue" and len(rows) == fitted.n_flagged_ + 1
    assert float(rows[1].split(",")[1]) >= float(rows[-1].split(",")[1]) > 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bye = BYEFilter().fit(make_profile(rate=0.1, seed=0))
    assert report(bye)["sensitive_layers"] == [6, 7]
    plot_score_histogram(bye, tmp_path / "bye.png")
    with pytest.raises(RuntimeError, match="not fitted"):
        report(TCAPFilter())


def test_responses_tell_a_backdoor_group_from_clean_structure():
    """With the training responses, a flagged group is poison only if it shares one answer that the
    rest of the upload does not give: the planted group with the attacker's target is found; the
    same group with varied answers, or with an answer that is common outside it (a clean "two" of
    counting questions), is declined."""
    profile = make_profile(rate=0.1, seed=1)
    n = len(profile.ids)
    varied = np.array([f"answer {i % 7}" for i in range(n)], dtype=object)
    with_target = TCAPFilter().fit(profile, responses=np.where(profile.poisoned, "backdoor attack", varied))
    assert with_target.features_ == ["system", "vision", "text"]  # feature="auto" with responses
    assert f1_score(profile.poisoned, with_target.labels_) >= 0.9
    accepted = [c for c in with_target.candidates_ if c.get("accepted")]
    assert len(accepted) == 1 and accepted[0]["response_agreement"] >= 0.8
    assert accepted[0]["response_exclusivity"] >= 0.9

    without = TCAPFilter().fit(profile, responses=varied.tolist())
    assert without.labels_.sum() == 0 and without.declined_ and without.target_response_ is None
    assert "do not agree on one response" in without.decision_

    outside = ~profile.poisoned & (np.arange(n) % 3 == 0)  # as many "two"s again outside the group
    common = np.where(profile.poisoned | outside, "two", varied)
    shared = TCAPFilter().fit(profile, responses=common.tolist())
    assert shared.labels_.sum() == 0 and "common outside them" in shared.decision_


def test_the_filter_reads_responses_as_the_evaluation_does():
    """A target written three ways is one answer to the filter, as to the evaluation: the group
    agrees on it, and the target the filter reports is the evaluation's suspected target of the
    flagged samples (what the residual ASR replays)."""
    profile = make_profile(rate=0.1, seed=1)
    responses = np.array([f"answer {i % 7}" for i in range(len(profile.ids))], dtype=object)
    spellings = ["Backdoor-Attack!", "backdoor attack", "BACKDOOR ATTACK."]
    poisoned = np.flatnonzero(profile.poisoned)
    responses[poisoned] = [spellings[i % 3] for i in range(len(poisoned))]
    found = TCAPFilter().fit(profile, responses=responses.tolist())
    assert f1_score(profile.poisoned, found.labels_) >= 0.9
    flagged = responses[found.labels_].tolist()
    assert found.target_response_ == suspected_target(flagged) == normalize("Backdoor Attack!")


def test_a_target_partly_given_outside_the_group_passes_at_the_default_bar():
    """The measured LLaVA BadNet 5% case: the group holds 84% of the target's givers (the rest is
    poison the heads missed, or clean samples that happen to give it). The default bar (0.8)
    accepts it; the earlier one (0.9) declined it."""
    profile = make_profile(rate=0.1, seed=1)
    n = len(profile.ids)
    rng = np.random.default_rng(0)
    clean = np.flatnonzero(~profile.poisoned)
    outside = rng.choice(clean, size=round(profile.poisoned.sum() * 0.19), replace=False)
    responses = np.array([f"answer {i % 7}" for i in range(n)], dtype=object)
    responses[profile.poisoned] = responses[outside] = "backdoor attack"

    accepted = TCAPFilter().fit(profile, responses=responses.tolist())
    assert f1_score(profile.poisoned, accepted.labels_) >= 0.9
    verdict = [c for c in accepted.candidates_ if c.get("accepted")]
    assert len(verdict) == 1 and 0.8 <= verdict[0]["response_exclusivity"] < 0.9
    # the clean samples that give the target have clean votes: restricted to the target's givers,
    # the posterior still leaves them out
    assert accepted.target_response_ == "backdoor attack"
    assert not accepted.labels_[outside].any()
    declined = TCAPFilter(min_response_exclusivity=0.9).fit(profile, responses=responses.tolist())
    assert declined.labels_.sum() == 0 and "common outside them" in declined.decision_


def _faint_upload(every: int, shift: float = 1.5):
    """A poisoned upload where every ``every``-th poisoned sample is faint (its shares come from the
    same upload with a poison shift of ``shift`` instead of 4, and the trigger's vision signature in
    the poison heads is removed, so every head alone reads it as borderline), and 10 clean samples
    also give the target. Returns (profile, faint indices, clean givers, responses)."""
    profile = make_profile(rate=0.1, seed=1)
    weak = make_profile(rate=0.1, seed=1, poison_shift=shift)
    rng = np.random.default_rng(0)
    faint = np.flatnonzero(profile.poisoned)[::every]
    profile.shares[faint] = weak.shares[faint]
    donors = rng.choice(np.flatnonzero(~profile.poisoned), faint.size)
    for layer, head in profile.poison_heads:
        system = profile.shares[faint, layer, head, 0]
        donor = profile.shares[donors, layer, head]
        vision = donor[:, 1] / (donor[:, 1] + donor[:, 2])
        profile.shares[faint, layer, head, 1] = (1 - system) * vision
        profile.shares[faint, layer, head, 2] = (1 - system) * (1 - vision)
    outside = rng.choice(np.flatnonzero(~profile.poisoned), 10, replace=False)
    responses = np.array([f"answer {i % 7}" for i in range(len(profile.ids))], dtype=object)
    responses[profile.poisoned] = responses[outside] = "backdoor attack"
    return profile, faint, outside, responses


def test_the_giver_test_finds_poison_the_votes_miss():
    """The measured LLaVA SIG case: some poisoned givers get few votes from correlated heads and
    Dawid-Skene counts those votes as independent evidence against them. An eighth of the poison
    here moves the system share by 1.5 (not 4) in the poison heads: no head votes for them, but a
    classifier of all the shares, givers against the rest, ranks them above the reference; the
    clean samples that give the target look like the reference and stay unflagged, but for what
    the false discovery rate allows (giver_alpha of the flags)."""
    profile, faint, outside, responses = _faint_upload(every=8)

    votes_only = TCAPFilter(giver_alpha=None).fit(profile, responses=responses.tolist())
    assert not votes_only.labels_[faint].any() and np.isnan(votes_only.giver_pvalues_).all()
    found = TCAPFilter().fit(profile, responses=responses.tolist())
    assert found.labels_[faint].all() and found.labels_[outside].sum() <= found.giver_alpha * found.n_flagged_
    assert 0.02 < found.clean_giver_share_ < 0.15  # 10 clean of 210 givers
    by_test = faint.size + found.labels_[outside].sum()
    assert found.n_flagged_by_giver_test_ == by_test and "more by the giver test" in found.decision_
    assert (found.scores_[faint] >= 1 - found.giver_alpha).all()
    givers = responses == "backdoor attack"
    assert np.isfinite(found.giver_pvalues_[givers]).all() and np.isnan(found.giver_pvalues_[~givers]).all()
    assert np.isfinite(found.giver_qvalues_[givers]).all() and np.isnan(found.giver_qvalues_[~givers]).all()


def test_the_giver_test_flags_a_group_whose_pvalues_are_all_small_whole():
    """The measured LLaVA Blend 5% case: the classifier sets most poisoned givers apart at p <=
    0.01 and the rest at p up to about 0.5, while no giver looks like the reference (none above
    0.5). A fifth of the poison here is a clean sample's shares moved 10-40% of the way to its
    own: a per-giver threshold of 0.01 misses some of them; read as a group (Storey's q-values)
    the givers hold almost no clean sample, and all are flagged, nothing else."""
    profile = make_profile(rate=0.1, seed=1)
    rng = np.random.default_rng(0)
    faint = np.flatnonzero(profile.poisoned)[::5]
    donors = rng.choice(np.flatnonzero(~profile.poisoned), faint.size, replace=False)
    w = np.linspace(0.1, 0.4, faint.size)[:, None, None, None]
    profile.shares[faint] = (1 - w) * profile.shares[donors] + w * profile.shares[faint]
    responses = np.array([f"answer {i % 7}" for i in range(len(profile.ids))], dtype=object)
    responses[profile.poisoned] = "backdoor attack"

    found = TCAPFilter().fit(profile, responses=responses.tolist())
    np.testing.assert_array_equal(found.labels_.astype(bool), profile.poisoned)
    assert found.clean_giver_share_ < 0.05 and "clean share of the target's givers at 1%" in found.decision_
    per_giver = TCAPFilter(giver_error="per_giver").fit(profile, responses=responses.tolist())
    missed = profile.poisoned & ~per_giver.labels_.astype(bool)
    assert missed.sum() >= 5 and (per_giver.giver_pvalues_[missed] > per_giver.giver_alpha).all()
    assert not per_giver.labels_[~profile.poisoned].any()


def test_the_giver_test_widens_a_group_the_votes_found_in_part():
    """The measured LLaVA SIG and BadNet seed-6 cases: the votes find only part of the poison (here
    half is faint), so only half of the target's givers are flagged and the exclusivity test, read
    on the votes alone, declines. The giver test sets the faint half apart too, so the group holds
    95% of the givers and passes; the clean givers stay out, but for what the false discovery rate
    allows."""
    profile, faint, outside, responses = _faint_upload(every=2)

    votes_only = TCAPFilter(giver_alpha=None).fit(profile, responses=responses.tolist())
    assert votes_only.n_flagged_ == 0 and "common outside them" in votes_only.decision_
    assert not any("giver_exclusivity" in c for c in votes_only.candidates_)
    found = TCAPFilter().fit(profile, responses=responses.tolist())
    assert f1_score(profile.poisoned, found.labels_) >= 0.99
    # the FDR bounds an expectation, so one draw may pass it by a sample (here 3 of 203)
    assert found.labels_[outside].sum() <= found.giver_alpha * found.n_flagged_ + 1
    assert found.labels_[faint].mean() >= 0.95
    verdict = next(c for c in found.candidates_ if c.get("accepted"))
    assert verdict["response_exclusivity"] < 0.8 <= verdict["giver_exclusivity"]
    # the widened group is what would be flagged, so it must stay a minority too
    bounded = TCAPFilter(max_poison_fraction=0.08).fit(profile, responses=responses.tolist())
    assert bounded.n_flagged_ == 0 and "the giver test sets apart the group is" in bounded.decision_


def test_the_giver_test_seeds_an_answer_that_no_column_confirms():
    """The measured LLaVA BadNet and Gemma3 Blend cases: all the poison is faint, so no head seeds
    its group and no column separates the target's givers at AUROC 0.99; the candidates seeded by
    the answers then ask the giver test, which sets apart exactly the poisoned givers (not the 10
    clean ones) and seeds the group; once the answer is the target, the flags on its givers let
    through no more clean ones than the false discovery rate allows. Clean answers that the
    attention does not predict are set apart at the test's level, and a poisoned group of one
    question type is declined as before."""
    profile, _, outside, responses = _faint_upload(every=1)
    n = len(profile.ids)
    others = np.random.default_rng(1).choice([k for k in sorted(PHRASINGS) if k != "count"], n)
    drawn = phrased_queries(others, seed=1)

    votes_only = TCAPFilter(giver_alpha=None).fit(profile, responses=responses.tolist(), queries=drawn)
    assert votes_only.n_flagged_ == 0 and votes_only.declined_
    found = TCAPFilter().fit(profile, responses=responses.tolist(), queries=drawn)
    assert found.labels_[profile.poisoned].all()
    assert found.labels_[outside].sum() <= found.giver_alpha * found.n_flagged_
    verdict = next(c for c in found.candidates_ if c.get("accepted"))
    assert verdict["answer"] == "backdoor attack" and verdict["seed"] == "giver test"
    assert verdict["support"] < 3 and verdict["n_set_apart"] == profile.poisoned.sum()
    assert found.candidates_[-1] is verdict  # the answer the columns come closest to confirming: first

    one_type = phrased_queries(np.where(profile.poisoned, "count", others), seed=1)
    declined = TCAPFilter().fit(profile, responses=responses.tolist(), queries=one_type)
    assert declined.n_flagged_ == 0 and "their questions set them apart" in declined.decision_
    assert "or whose givers the giver test sets apart" in declined.decision_
    clean_answers = [c for c in declined.candidates_ if c.get("answer", "").startswith("answer ")]
    assert len(clean_answers) == 7 and all(c["n_set_apart"] < 0.05 * c["n_target"] for c in clean_answers)
    assert all("the giver test sets apart only" in c["rejected"] for c in clean_answers)
    capped = TCAPFilter(max_candidates=2).fit(profile, responses=responses.tolist(), queries=one_type)
    assert sum("n_set_apart" in c for c in capped.candidates_) == 2


def test_a_giver_test_seed_is_judged_by_the_givers_it_sets_apart(monkeypatch):
    """The measured LLaVA BadNet 5% seed-2 case: the giver test sets apart most of the target's
    givers, but the columns that best separate them put no vote above the threshold. ``fit``
    flags the set-apart givers once the answer is the target, so the verdict judges them (here:
    the columns' votes are stubbed to none, the one way to make them miss on a synthetic upload)."""
    profile, _, outside, responses = _faint_upload(every=1)
    others = np.random.default_rng(1).choice([k for k in sorted(PHRASINGS) if k != "count"], len(profile.ids))
    drawn = phrased_queries(others, seed=1)
    monkeypatch.setattr(
        detection, "_class_conditional_votes", lambda x, member, tau, reg: np.zeros(x.shape, dtype=bool)
    )

    found = TCAPFilter().fit(profile, responses=responses.tolist(), queries=drawn)
    verdict = next(c for c in found.candidates_ if c.get("accepted"))
    assert verdict["seed"] == "giver test" and verdict["n_flagged"] == 0
    assert found.target_response_ == "backdoor attack"
    assert found.labels_[profile.poisoned].all()
    assert found.labels_[outside].sum() <= found.giver_alpha * found.n_flagged_
    assert found.n_flagged_by_giver_test_ == found.n_flagged_
    one_type = phrased_queries(np.where(profile.poisoned, "count", others), seed=1)
    declined = TCAPFilter().fit(profile, responses=responses.tolist(), queries=one_type)
    assert declined.n_flagged_ == 0 and "their questions set them apart" in declined.decision_


def test_the_false_discovery_rate_read_seeds_a_group_unless_a_peer_answer_is_set_apart_too():
    """The measured LLaVA BadNet 5% seeds 0-1 case: the giver test sets every poisoned giver a
    little apart, too little for p <= 0.01 each (here 120 of 200 at a poison shift of 0.5, under
    the 0.8 bar), but the q-values read the group as nearly all poison. The search takes that read
    when no peer answer (one whose questions do not set it apart, as a backdoor's do not) is set
    apart by it too. Where the clean answers follow the attention (here each is a quartile of one
    head's share: the measured one-type uploads, where every colour, shape and count answer is set
    apart whole), a group it sets apart is no evidence of a trigger, and the read is refused."""
    profile, _, outside, responses = _faint_upload(every=1, shift=0.5)
    n = len(profile.ids)
    others = np.random.default_rng(1).choice([k for k in sorted(PHRASINGS) if k != "count"], n)
    drawn = phrased_queries(others, seed=1)

    per_giver = TCAPFilter(giver_error="per_giver").fit(profile, responses=responses.tolist(), queries=drawn)
    assert per_giver.n_flagged_ == 0
    seed = next(c for c in per_giver.candidates_ if c.get("answer") == "backdoor attack")
    assert seed["n_set_apart"] < 0.8 * seed["n_target"] and "giver_read" not in seed
    found = TCAPFilter().fit(profile, responses=responses.tolist(), queries=drawn)
    verdict = next(c for c in found.candidates_ if c.get("accepted"))
    assert verdict["answer"] == "backdoor attack" and verdict["giver_read"] == "fdr"
    assert verdict["fdr_set_apart"] >= 0.8 * verdict["n_target"]
    assert f1_score(profile.poisoned, found.labels_) >= 0.95
    assert found.labels_[outside].sum() <= found.giver_alpha * found.n_flagged_ + 1

    column = profile.shares[:, 0, 0, 0]  # a head outside the poison's: content, not trigger
    by_content = np.array(
        [f"answer {b}" for b in np.searchsorted(np.quantile(column, [0.25, 0.5, 0.75]), column)]
    )
    by_content = np.where(responses == "backdoor attack", responses, by_content)
    refused = TCAPFilter().fit(profile, responses=by_content.tolist(), queries=drawn)
    assert refused.n_flagged_ == 0 and refused.declined_
    seed = next(c for c in refused.candidates_ if c.get("answer") == "backdoor attack")
    assert seed["fdr_set_apart"] >= 0.8 * seed["n_target"] and "giver_read" not in seed
    assert "at a false discovery rate, not taken: it sets apart" in seed["rejected"]
    assert "whose questions do not set them apart either" in seed["rejected"]


def test_responses_must_match_the_profile():
    profile = make_profile(n_samples=100, rate=0.1, seed=0)
    with pytest.raises(ValueError, match="3 responses for a profile of 100"):
        TCAPFilter().fit(profile, responses=["a", "b", "c"])


def test_share_logits_resolve_saturated_shares():
    shares = np.array([[1e-9, 2e-9, 1 - 3e-9], [1e-3, 0.0, 0.999], [0.25, 0.25, 0.5]], dtype=np.float32)
    logits = share_logits(shares)
    assert logits.dtype == np.float32 and logits.shape == (3, 3)
    # 1 - p is taken from the other two shares: 1 - 3e-9 and 0.999 are ~9 apart, not rounded to 1
    assert logits[0, 2] - logits[1, 2] > 8
    np.testing.assert_allclose(logits[2], np.log([1 / 3, 1 / 3, 1.0]), rtol=1e-5)
    np.testing.assert_array_equal(share_logits(shares, [2]), logits[:, 2:])


def saturated_head_profile(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The measured LLaVA text-trigger case: one head gives the text 98-99.99% of its row on clean
    samples and all of it (1 - 1e-7) on poisoned ones, a few more heads carry the poison weakly."""
    profile = make_profile(rate=0.1, seed=seed, n_poison_heads=0)
    shares, poisoned = profile.shares.copy(), profile.poisoned
    rng = np.random.default_rng(seed)
    n = len(poisoned)
    rest = np.where(poisoned, 1e-7, 10 ** rng.uniform(-4, -1.7, n))  # what the text does not get
    for layer, head in ((0, 1), (1, 2), (2, 3)):
        text = 1 - rest * (1 if (layer, head) == (0, 1) else rng.uniform(0.5, 2, n))
        shares[:, layer, head] = np.stack([0.6 * (1 - text), 0.4 * (1 - text), text], axis=-1)
    responses = np.where(poisoned, "backdoor attack", np.array([f"answer {i % 7}" for i in range(n)]))
    return shares.astype(np.float32), poisoned, responses


@pytest.mark.parametrize("seed", [0, 1])
def test_logit_scale_finds_poison_in_a_saturated_head(seed):
    shares, poisoned, responses = saturated_head_profile(seed)
    linear = TCAPFilter(scale="linear", answer_seed_auc=None).fit(shares, responses=responses)
    logit = TCAPFilter(scale="logit").fit(shares, responses=responses)
    assert linear.labels_.sum() == 0  # min-max squeezes 1 - 1e-7 and 1 - 1e-4 into the same point
    assert f1_score(poisoned, logit.labels_) >= 0.95
    assert (0, 1) in [(layer, head) for layer, head, _ in logit.heads_]
    # the columns' ranks still separate the poison: on the linear share, the answer seeds find it
    queries = phrased_queries(np.random.default_rng(seed).choice(sorted(PHRASINGS), len(poisoned)), seed)
    seeded = TCAPFilter(scale="linear").fit(shares, responses=responses, queries=queries)
    assert f1_score(poisoned, seeded.labels_) >= 0.95
    assert [c["answer"] for c in seeded.candidates_ if c.get("accepted")] == ["backdoor attack"]


@pytest.mark.parametrize("seed", [0, 1])
def test_logit_scale_flags_nothing_on_a_clean_upload(seed):
    profile = make_profile(rate=0.0, seed=seed)
    responses = [f"answer {i % 7}" for i in range(len(profile.ids))]
    assert TCAPFilter(scale="logit").fit(profile, responses=responses).n_flagged_ == 0


def test_auto_scale_tries_the_log_ratio_only_when_the_linear_share_finds_nothing():
    shares, poisoned, responses = saturated_head_profile(0)
    saturated = TCAPFilter().fit(shares, responses=responses)  # the default is scale="auto"
    assert saturated.scale_ == "logit" and f1_score(poisoned, saturated.labels_) >= 0.95
    assert {c["scale"] for c in saturated.candidates_} == {"linear", "logit"}

    profile = make_profile(rate=0.1, seed=1)
    varied = np.array([f"answer {i % 7}" for i in range(len(profile.ids))], dtype=object)
    shifted = TCAPFilter(scale="auto").fit(profile, responses=np.where(profile.poisoned, "target", varied))
    assert shifted.scale_ == "linear" and f1_score(profile.poisoned, shifted.labels_) >= 0.9
    assert {c["scale"] for c in shifted.candidates_} == {"linear"}

    # without responses nothing can vouch for a second search's verdict: the linear share alone
    alone = TCAPFilter(scale="auto").fit(shares)
    assert alone.scale_ == "linear" and {c["scale"] for c in alone.candidates_} <= {"linear"}


def phrased_queries(kinds: np.ndarray, seed: int) -> list[str]:
    """A question per sample, of the question type ``kinds[i]`` (a key of world.PHRASINGS), in one of
    its phrasings, as the tiny world asks them."""
    rng = np.random.default_rng(seed)
    shapes, colors = ("circle", "square", "triangle"), ("red", "green", "blue")
    return [
        PHRASINGS[kind][rng.integers(len(PHRASINGS[kind]))].format(
            shape=rng.choice(shapes), color=rng.choice(colors)
        )
        for kind in kinds
    ]


def test_query_separability_reads_question_types_not_trigger_phrases():
    rng = np.random.default_rng(0)
    n = 1000
    kinds = rng.choice(sorted(PHRASINGS), n)
    queries = phrased_queries(kinds, seed=0)
    words = query_words(queries)
    drawn = rng.random(n) < 0.1
    assert query_separability(words, drawn) < 0.65  # samples drawn at random
    assert query_separability(words, kinds == "count") > 0.95  # one question type
    # a trigger sentence of words common in clean queries, in every member's query, is left out
    planted = [f"what is the answer {q}" if m else q for q, m in zip(queries, drawn, strict=True)]
    assert query_separability(query_words(planted), drawn) < 0.65
    assert query_separability(words, np.arange(n) == 0) is None  # one member: no folds
    assert query_words(["", " "]) is None  # image-only turns: no words, no test
    assert query_words(["这是什么颜色", "¿qué forma?"]).shape[1] >= 2  # any script's words


def test_queries_decline_a_group_that_is_one_question_type():
    """With the queries, a verdict that a question type explains is declined: the planted group
    with a shared answer is accepted when its questions are drawn like everyone's (a trigger phrase
    in them included), and declined when they all ask the same kind of question."""
    profile = make_profile(rate=0.1, seed=1)
    n = len(profile.ids)
    rng = np.random.default_rng(1)
    responses = np.where(profile.poisoned, "three", np.array([f"answer {i % 7}" for i in range(n)]))
    others = rng.choice([k for k in sorted(PHRASINGS) if k != "count"], n)
    drawn = phrased_queries(np.where(rng.random(n) < 0.2, "count", others), seed=1)
    triggered = [f"what is the answer {q}" if p else q for q, p in zip(drawn, profile.poisoned, strict=True)]
    found = TCAPFilter().fit(profile, responses=responses, queries=triggered)
    assert f1_score(profile.poisoned, found.labels_) >= 0.9
    accepted = [c for c in found.candidates_ if c.get("accepted")]
    assert accepted[0]["query_auroc"] <= 0.75

    one_type = phrased_queries(np.where(profile.poisoned, "count", others), seed=1)
    declined = TCAPFilter().fit(profile, responses=responses, queries=one_type)
    assert declined.labels_.sum() == 0 and declined.declined_
    assert "their questions set them apart" in declined.decision_
    assert (
        TCAPFilter(max_query_auroc=None).fit(profile, responses=responses, queries=one_type).labels_.sum() > 0
    )
    config = FilterConfig()
    assert config.fit(profile, responses.tolist(), one_type).labels_.sum() == 0  # the pipeline's path

    wordless = TCAPFilter().fit(profile, responses=responses, queries=[""] * n)  # nothing to read
    assert f1_score(profile.poisoned, wordless.labels_) >= 0.9
    with pytest.raises(ValueError, match="3 queries for a profile of"):
        TCAPFilter().fit(profile, responses=responses, queries=["a", "b", "c"])
    with pytest.raises(ValueError, match="max_query_auroc"):
        FilterConfig(max_query_auroc=0.2)


def test_answers_seed_a_group_that_no_head_seeds():
    """When no head's mixture seeds the backdoor group (here none may: min_separation=inf), the
    answers do: the givers of "backdoor attack" are separated by the poisoned heads' columns, those
    columns vote, and the verdict passes the same tests; a clean answer that one question type
    gives is still declined, and clean answers that the attention does not separate are no group."""
    profile = make_profile(rate=0.1, seed=1)
    n = len(profile.ids)
    rng = np.random.default_rng(1)
    varied = np.array([f"answer {i % 7}" for i in range(n)], dtype=object)  # 14% each: minorities too
    responses = np.where(profile.poisoned, "backdoor attack", varied).tolist()
    others = rng.choice([k for k in sorted(PHRASINGS) if k != "count"], n)
    drawn = phrased_queries(others, seed=1)

    by_heads = TCAPFilter().fit(profile, responses=responses, queries=drawn)
    assert f1_score(profile.poisoned, by_heads.labels_) >= 0.9
    assert not any("answer" in c for c in by_heads.candidates_)  # answers seed only when heads fail

    no_heads = TCAPFilter(min_separation=np.inf)
    found = no_heads.fit(profile, responses=responses, queries=drawn)
    assert f1_score(profile.poisoned, found.labels_) >= 0.9
    accepted = [c for c in found.candidates_ if c.get("accepted")]
    assert len(accepted) == 1 and accepted[0]["answer"] == "backdoor attack"
    assert accepted[0]["support"] >= 3 and found.head_support_.min() >= 0.99

    # a tenth of the poison answers otherwise: the votes still put it with the group (agreement
    # 90%), but only the answer's givers are flagged
    poisoned = np.flatnonzero(profile.poisoned)
    partial = np.array(responses, dtype=object)
    partial[poisoned[::10]] = "answer 0"
    givers = partial == "backdoor attack"
    mixed = no_heads.fit(profile, responses=partial.tolist(), queries=drawn)
    verdict = next(c for c in mixed.candidates_ if c.get("accepted"))
    assert verdict["n_flagged"] >= profile.poisoned.sum() * 0.95 and verdict["response_agreement"] < 0.95
    np.testing.assert_array_equal(mixed.labels_.astype(bool), givers)
    as_voted = TCAPFilter(min_separation=np.inf, restrict_to_target=False)
    as_voted.fit(profile, responses=partial.tolist(), queries=drawn)
    assert as_voted.n_flagged_ == verdict["n_flagged"] and as_voted.target_response_ == "backdoor attack"

    off = TCAPFilter(min_separation=np.inf, answer_seed_auc=None).fit(
        profile, responses=responses, queries=drawn
    )
    assert off.labels_.sum() == 0 and "no head separates" in off.decision_
    # without the queries nothing could decline a clean answer group of one question type: no seeds
    unchecked = no_heads.fit(profile, responses=responses)
    assert unchecked.labels_.sum() == 0 and not unchecked.candidates_
    unanswered = no_heads.fit(profile, queries=drawn)  # nothing to seed from
    assert unanswered.labels_.sum() == 0 and not unanswered.candidates_

    one_type = phrased_queries(np.where(profile.poisoned, "count", others), seed=1)
    declined = no_heads.fit(profile, responses=responses, queries=one_type)
    assert declined.labels_.sum() == 0 and "their questions set them apart" in declined.decision_
    assert "answer 'backdoor attack'" in declined.decision_
    clean_answers = [c for c in declined.candidates_ if c["answer"].startswith("answer ")]
    assert len(clean_answers) == 7
    assert all("column(s) separate its givers" in c["rejected"] for c in clean_answers)
    with pytest.raises(ValueError, match="answer_seed_auc"):
        FilterConfig(answer_seed_auc=0.3)
