"""The tiny VQA world: deterministic scenes whose answers follow from the scene, diverse phrasings."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from tcapguard import world
from tcapguard.data import load_dataset
from tcapguard.world import COLORS, COUNT_WORDS, PHRASINGS, PREFIXES, QUADRANTS, SHAPES, SUFFIXES

QTYPES = set(PHRASINGS)


@pytest.fixture(scope="module")
def samples() -> list:
    return list(world.sample_records(500, seed=0))


def _alternatives(options) -> str:
    return "|".join(re.escape(o) for o in options if o)


def _query_patterns(qtype: str) -> list[re.Pattern]:
    """One pattern per phrasing of ``qtype``: optional prefix, the phrasing, optional suffix."""
    patterns = []
    for phrasing in PHRASINGS[qtype]:
        core = re.escape(phrasing)
        core = core.replace(re.escape("{color}"), f"(?P<color>{_alternatives(COLORS)})")
        core = core.replace(re.escape("{shape}"), f"(?P<shape>{_alternatives(SHAPES)})")
        patterns.append(
            re.compile(f"(?:(?:{_alternatives(PREFIXES)}) )?{core}(?: (?:{_alternatives(SUFFIXES)}))?")
        )
    return patterns


PATTERNS = {qtype: _query_patterns(qtype) for qtype in PHRASINGS}


def parse_query(query: str, qtype: str) -> dict[str, str]:
    """The colour/shape a query of ``qtype`` names (fails the test if it is not such a query)."""
    for pattern in PATTERNS[qtype]:
        match = pattern.fullmatch(query)
        if match:
            return match.groupdict()
    raise AssertionError(f"{query!r} is not a {qtype} question")


def scene_of(record) -> list[tuple[str, str, str]]:
    return [tuple(shape) for shape in record.extra["scene"]]


def test_same_seed_same_samples():
    first, again = list(world.sample_records(20, seed=3)), list(world.sample_records(20, seed=3))
    assert first == again
    assert all(a.pixels.tobytes() == b.pixels.tobytes() for a, b in zip(first, again, strict=True))


def test_different_seeds_differ():
    a, b = list(world.sample_records(20, seed=3)), list(world.sample_records(20, seed=4))
    assert [r.conversations for r in a] != [r.conversations for r in b]
    assert [r.extra["scene"] for r in a] != [r.extra["scene"] for r in b]
    assert sum(x.pixels.tobytes() != y.pixels.tobytes() for x, y in zip(a, b, strict=True)) >= 18


def test_questions_per_scene_must_be_positive():
    with pytest.raises(ValueError, match="questions must be at least 1, got 0"):
        next(world.sample_records(1, seed=0, questions=0))


def test_several_questions_per_scene_are_turns_about_the_same_scene():
    for record in world.sample_records(30, seed=3, questions=3):
        assert [t.role for t in record.conversations] == ["human", "gpt"] * 3
        assert world.IMAGE_PLACEHOLDER in record.conversations[0].value
        assert not any(world.IMAGE_PLACEHOLDER in t.value for t in record.conversations[1:])
        kinds, colors, quadrants = zip(*scene_of(record), strict=True)
        possible = {*kinds, *colors, *quadrants, *world.COUNT_WORDS, "yes", "no"}
        assert all(t.value in possible for t in record.conversations[1::2])


def test_records_are_well_formed(samples):
    for record in samples:
        assert record.extra["qtype"] in QTYPES
        scene = scene_of(record)
        assert 1 <= len(scene) <= 3
        assert len({quadrant for _, _, quadrant in scene}) == len(scene)
        assert all(k in SHAPES and c in COLORS and q in QUADRANTS for k, c, q in scene)
        assert record.has_image and record.image is None
        assert record.pixels.size == (32, 32) and record.pixels.mode == "RGB"
        assert record.conversations[0].value.startswith("<image>\n")
        assert record.system in world.SYSTEM_PROMPTS
        assert 4 <= len(record.query.split()) <= 21


def answer_follows_from_scene(qtype: str, named: dict[str, str], scene, answer: str) -> bool:
    if qtype == "count":
        return answer == COUNT_WORDS[len(scene)]
    if qtype == "color":  # the named shape kind occurs once, in the answered colour
        return [c for k, c, _ in scene if k == named["shape"]] == [answer]
    if qtype == "shape":  # the named colour occurs once, on the answered shape
        return [k for k, c, _ in scene if c == named["color"]] == [answer]
    if qtype == "position":  # exactly one shape of the named colour and kind, in the answered quadrant
        return [q for k, c, q in scene if (k, c) == (named["shape"], named["color"])] == [answer]
    present = any((k, c) == (named["shape"], named["color"]) for k, c, _ in scene)
    return answer == ("yes" if present else "no")


@pytest.mark.parametrize("qtype", sorted(QTYPES))
def test_every_answer_follows_from_the_scene(samples, qtype):
    """Each question names what it asks about unambiguously, and the answer is the scene's."""
    asked = [r for r in samples if r.extra["qtype"] == qtype]
    assert len(asked) >= 50
    wrong = [
        (r.id, r.query, r.response, scene_of(r))
        for r in asked
        if not answer_follows_from_scene(qtype, parse_query(r.query, qtype), scene_of(r), r.response)
    ]
    assert not wrong, (
        f"{len(wrong)} of {len(asked)} {qtype} answers do not follow from the scene: {wrong[:3]}"
    )


def test_image_draws_the_scene(samples):
    """Each shape's colour fills part of its quadrant; empty quadrants hold only background."""
    for record in samples[:100]:
        pixels = np.asarray(record.pixels)
        occupied = {q: c for _, c, q in scene_of(record)}
        for index, quadrant in enumerate(QUADRANTS):
            row, col = divmod(index, 2)
            block = pixels[16 * row : 16 * row + 16, 16 * col : 16 * col + 16]
            if quadrant in occupied:
                assert (block == COLORS[occupied[quadrant]]).all(axis=-1).sum() >= 20, (record.id, quadrant)
            else:
                assert (block >= 200).all(), (record.id, quadrant)


def test_read_scene_recovers_every_quadrant(samples):
    """The base's pre-training targets: every quadrant's colour and kind, read back from pixels."""
    import torch

    pixels = torch.stack([torch.from_numpy(np.asarray(r.pixels, dtype=np.float32) / 255) for r in samples])
    color, kind = world.read_scene(pixels.permute(0, 3, 1, 2))
    want_color = torch.full((len(samples), 4), len(COLORS))
    want_kind = torch.full((len(samples), 4), len(SHAPES))
    for i, record in enumerate(samples):
        for shape, colour, quadrant in scene_of(record):
            want_color[i, QUADRANTS.index(quadrant)] = list(COLORS).index(colour)
            want_kind[i, QUADRANTS.index(quadrant)] = SHAPES.index(shape)
    assert torch.equal(color, want_color) and torch.equal(kind, want_kind)
    assert set(kind.flatten().tolist()) == set(range(len(SHAPES) + 1))  # every kind, and empty ones


def test_all_question_types_and_many_phrasings(samples):
    qtypes = Counter(r.extra["qtype"] for r in samples)
    assert set(qtypes) == QTYPES and min(qtypes.values()) >= 50
    assert len({r.query for r in samples}) >= 150
    assert len({r.system for r in samples}) == len(world.SYSTEM_PROMPTS)
    answers = Counter(r.response for r in samples if r.extra["qtype"] == "exists")
    assert set(answers) == {"yes", "no"}


def test_write_vqa_world_round_trips(tmp_path):
    out = world.write_vqa_world(tmp_path / "vqa", n_train=12, n_test=5, seed=2)
    train, test = load_dataset(out / "train.json"), load_dataset(out / "test.json")
    assert (len(train), len(test)) == (12, 5)
    assert not train.problems and not test.problems
    assert not set(train.ids) & set(test.ids)
    assert all(i.startswith("train-") for i in train.ids) and all(i.startswith("test-") for i in test.ids)
    expected = world.make_split(12, seed=2, id_prefix="train")
    for saved, original in zip(train.records, expected.records, strict=True):
        assert saved.conversations == original.conversations and saved.system == original.system
        assert saved.extra == original.extra
        assert train.load_image(saved).tobytes() == original.pixels.tobytes()
    assert [r.extra["scene"] for r in test] != [r.extra["scene"] for r in train][:5]
    longer = world.test_split(9, seed=2)  # more clean questions for a benchmark, the written ones first
    assert longer.ids[:5] == test.ids and len(set(longer.ids)) == 9
    for saved, original in zip(test.records, longer.records, strict=False):
        assert saved.conversations == original.conversations
        assert test.load_image(saved).tobytes() == original.pixels.tobytes()


def test_corpus_covers_every_word_the_world_writes(samples):
    corpus = list(world.corpus())
    words = {word for text in corpus for word in text.split()}
    used = Counter()
    for record in samples:
        for text in (record.query, record.response, record.system):
            used.update(text.split())
    missing = sorted(set(used) - words)
    assert not missing, f"words the tokenizer corpus lacks: {missing}"
    for qtype, phrasings in PHRASINGS.items():
        for phrasing in phrasings:
            assert phrasing.format(color="red", shape="circle") in corpus, qtype
