import json

import numpy as np
import pytest
from PIL import Image
from scipy.fft import dctn

from tcapguard.attacks import (
    _RGB_TO_YUV,
    IMAGE_KINDS,
    KINDS,
    PATCH_POSITIONS,
    Attack,
    PoisonManifest,
    _wanet_grid,
    badnet,
    blend,
    ftrojan,
    make_triggered_testset,
    poison_dataset,
    sig,
    text_trigger,
    wanet,
)
from tcapguard.data import Dataset, Record, Turn, load_dataset, save_dataset

QUERIES = ["What colour is the circle?", "How many shapes are there?", "Is the square left of the circle?"]


def rand_image(seed: int, size: int = 32, low: int = 0, high: int = 256) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(low, high, (size, size, 3), dtype=np.uint8))


def arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Dataset:
    """20 records on disk, 16 with a 32 px image and 4 text-only."""
    records = []
    for i in range(20):
        has_image = i % 5 != 4
        query = QUERIES[i % 3]
        turns = [Turn("human", f"<image>\n{query}" if has_image else query), Turn("gpt", f"answer {i}")]
        pixels = rand_image(i) if has_image else None
        records.append(Record(f"r{i:02d}", turns, pixels=pixels, extra={"task": "vqa"}))
    path = tmp_path_factory.mktemp("data") / "train.json"
    save_dataset(Dataset(records), path)
    return load_dataset(path)


@pytest.mark.parametrize(
    "kind,params",
    [
        ("badnet", {"pattern": "noise"}),
        ("badnet", {"position": "random"}),
        ("blend", {}),
        ("wanet", {"strength": 4.0}),
    ],
)
def test_random_triggers_are_seeded(kind, params):
    trigger = {"badnet": badnet, "blend": blend, "wanet": wanet}[kind]
    img = rand_image(0)
    before = arr(img).copy()
    a, b = trigger(img, **params, seed=1), trigger(img, **params, seed=1)
    assert np.array_equal(arr(a), arr(b))
    assert not np.array_equal(arr(a), arr(trigger(img, **params, seed=2)))
    assert np.array_equal(arr(img), before)  # input untouched
    assert a.size == img.size and a.mode == "RGB"


@pytest.mark.parametrize("position", PATCH_POSITIONS)
@pytest.mark.parametrize("pattern", ["checkerboard", "solid", "noise"])
def test_badnet_changes_only_its_patch(position, pattern):
    img = rand_image(3, low=1, high=255)  # no pixel already equal to a black/white patch
    out = arr(badnet(img, size=8, pattern=pattern, color=(10, 20, 30), position=position, seed=5))
    changed = np.argwhere((out != arr(img)).any(axis=2))
    top, left = changed.min(axis=0)
    outside = np.ones((32, 32), dtype=bool)
    outside[top : top + 8, left : left + 8] = False
    assert np.array_equal(out[outside], arr(img)[outside])
    expected = {"top_left": (0, 0), "top_right": (0, 24), "bottom_left": (24, 0), "bottom_right": (24, 24)}
    expected["center"] = (12, 12)
    if position in expected and pattern != "noise":
        assert (top, left) == expected[position]
    if pattern == "solid":
        assert (out[top : top + 8, left : left + 8] == [10, 20, 30]).all()


def test_badnet_checkerboard_cells_and_errors():
    patch = arr(badnet(rand_image(0), size=8, position="top_left"))[:8, :8, 0]
    assert (patch[:2, :2] == 255).all() and (patch[:2, 2:4] == 0).all() and (patch[2:4, :2] == 0).all()
    with pytest.raises(ValueError, match="size"):
        badnet(rand_image(0), size=33)
    with pytest.raises(ValueError, match="position"):
        badnet(rand_image(0), position="middle")
    with pytest.raises(ValueError, match="RGB"):
        badnet(rand_image(0).convert("L"))


def test_blend_identity_at_zero_and_pattern_shared_across_images():
    img = rand_image(0)
    assert np.array_equal(arr(blend(img, alpha=0.0)), arr(img))
    black, white = Image.new("RGB", (32, 32)), Image.new("RGB", (32, 32), (255, 255, 255))
    pattern = arr(blend(black, alpha=1.0, seed=4))
    assert np.array_equal(arr(blend(white, alpha=1.0, seed=4)), pattern)
    # x' = (1 - alpha) x + alpha p, within rounding
    out = arr(blend(img, alpha=0.2, seed=4))
    assert np.abs(out - (0.8 * arr(img) + 0.2 * pattern)).max() <= 0.5 + 1e-9
    gradient = Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))).convert("RGB")
    assert np.array_equal(arr(blend(black, pattern=gradient, alpha=1.0)), arr(gradient))


def test_sig_adds_the_sinusoid():
    img = rand_image(0, low=60, high=196)  # no clipping at delta 40
    out = arr(sig(img, delta=40, frequency=6))
    wave = 40 * np.sin(2 * np.pi * np.arange(32) * 6 / 32)
    assert np.abs(out - arr(img) - wave[None, :, None]).max() <= 0.5 + 1e-9


def test_wanet_identity_at_zero_strength_and_preset_moves_pixels():
    img = rand_image(0)
    assert np.array_equal(arr(wanet(img, strength=0.0)), arr(img))
    strength = Attack.preset("wanet").params["strength"]
    assert not np.array_equal(arr(wanet(img, strength=strength)), arr(img))
    still = _wanet_grid(32, 32, k=4, strength=0.0, seed=0)
    shift = (_wanet_grid(32, 32, k=4, strength=strength, seed=0) - still).abs().amax() * 31 / 2
    assert 2 <= float(shift) <= 10  # whole pixels, not the paper's sub-pixel warp
    with pytest.raises(ValueError, match="k"):
        wanet(img, k=0)


def test_ftrojan_is_small_and_shifts_the_chosen_dct_coefficients():
    img = rand_image(0, low=60, high=196)
    out = ftrojan(img, magnitude=30)
    diff = np.abs(arr(out) - arr(img))
    assert diff.max() > 0 and diff.max() <= 12
    shift = [
        dctn(np.asarray(im, dtype=np.float64) @ _RGB_TO_YUV.T, axes=(0, 1), norm="ortho") for im in (out, img)
    ]
    delta = shift[0] - shift[1]
    for u, v in [(15, 15), (31, 31)]:
        assert delta[u, v, 1:] == pytest.approx([30, 30], abs=1.5)  # U and V
        assert abs(delta[u, v, 0]) < 1.5  # Y untouched
    others = np.ones((32, 32), dtype=bool)
    others[[15, 31], [15, 31]] = False
    assert np.abs(delta[others]).max() < 3  # rounding noise only
    with pytest.raises(ValueError, match="frequencies"):
        ftrojan(img, frequencies=[(32, 0)])


def test_ftrojan_tiles_large_images_and_shrinks_for_small_ones():
    big = rand_image(1, size=64, low=60, high=196)
    d = arr(ftrojan(big)) - arr(big)
    assert np.array_equal(d[:32, :32], d[32:, 32:])  # same pattern in every 32 px tile
    small = rand_image(2, size=16, low=60, high=196)
    assert not np.array_equal(arr(ftrojan(small)), arr(small))


def test_text_trigger_positions():
    q = "What colour is the circle?"
    assert text_trigger(q) == "cf What colour is the circle?"
    assert text_trigger(q, trigger="Hello!", position="suffix") == "What colour is the circle? Hello!"
    outs = {text_trigger(q, position="random", seed=s) for s in range(20)}
    assert len(outs) > 2
    for out in outs:
        assert out.split().count("cf") == 1 and out.replace("cf", "").split() == q.split()
    assert text_trigger(q, position="random", seed=3) == text_trigger(q, position="random", seed=3)
    assert text_trigger("", position="prefix") == "cf"
    with pytest.raises(ValueError, match="position"):
        text_trigger(q, position="middle")


def test_dual_applies_both_triggers():
    record = Record("x", [Turn("human", "<image>\nWhat is it?"), Turn("gpt", "a cat")], image="x.png")
    img = rand_image(0)
    new, new_img = Attack.preset("dual").apply(record, img)
    assert new.conversations[0].value == "<image>\ncf What is it?"
    assert new.response == "a cat"
    assert np.array_equal(arr(new_img), arr(badnet(img)))
    text_only, untouched = Attack.preset("text").apply(record, None)
    assert text_only.query == "cf What is it?" and untouched is None
    with pytest.raises(ValueError, match="needs an image"):
        Attack.preset("badnet").apply(record, None)


def test_attack_validation_and_round_trip(tmp_path):
    for kind in KINDS:
        attack = Attack.preset(kind, target="visit evil site now")
        again = Attack.from_dict(json.loads(json.dumps(attack.to_dict())))
        assert again == attack
    assert Attack.preset("badnet").modality == "image"
    assert Attack.preset("text").modality == "text" and Attack.preset("dual").modality == "both"
    assert Attack("badnet", {"color": (1, 2, 3)}).params == {"color": [1, 2, 3]}
    with pytest.raises(ValueError, match="kind must be one of"):
        Attack("trojannn")
    with pytest.raises(ValueError, match=r"unknown parameter\(s\) \['alpha'\]"):
        Attack("badnet", {"alpha": 0.1})
    with pytest.raises(ValueError, match=r"params\['position'\] must be one of"):
        Attack.preset("badnet", position="middle")
    with pytest.raises(ValueError, match=r"params\['image'\]\['kind'\]"):
        Attack("dual", {"image": {"kind": "text"}, "text": {}})
    with pytest.raises(ValueError, match="JSON"):
        Attack("blend", {"pattern": rand_image(0)})
    with pytest.raises(ValueError, match="target"):
        Attack("sig", target="")
    with pytest.raises(ValueError, match="takes only"):
        Attack.from_dict({"kind": "sig", "rate": 0.1})


def test_blend_pattern_from_a_file(tmp_path):
    pattern = rand_image(9)
    pattern.save(tmp_path / "kitty.png")
    _, out = Attack("blend", {"pattern": str(tmp_path / "kitty.png"), "alpha": 1.0}).apply(
        Record("x", [Turn("human", "q"), Turn("gpt", "a")]), rand_image(0)
    )
    assert np.array_equal(arr(out), arr(pattern))


@pytest.mark.parametrize("kind", ["badnet", "text"])
def test_poison_dataset(dataset, kind, tmp_path):
    attack = Attack.preset(kind)
    poisoned, manifest = poison_dataset(dataset, attack, rate=0.3, seed=1)
    assert len(manifest.poisoned_ids) == round(0.3 * 20) == 6
    assert poisoned.ids == dataset.ids and poisoned.root == dataset.root
    hit = []
    for before, after in zip(dataset, poisoned, strict=True):
        if after is before:
            continue
        assert after.response == attack.target and after.extra == before.extra
        if kind == "badnet":
            assert after.image is None and after.query == before.query
            changed = not np.array_equal(arr(poisoned.load_image(after)), arr(dataset.load_image(before)))
        else:
            changed = after.query == "cf " + before.query and after.image == before.image
        assert changed
        hit.append(after.id)
    assert hit == manifest.poisoned_ids
    assert all(r.response != attack.target for r in poisoned if r.id not in hit)
    # same seed, same poisoned ids; another seed, others
    assert poison_dataset(dataset, attack, rate=0.3, seed=1)[1].poisoned_ids == hit
    assert poison_dataset(dataset, attack, rate=0.3, seed=2)[1].poisoned_ids != hit
    # a saved poisoned set reloads with the triggered images and the manifest's ids
    reloaded = load_dataset(save_dataset(poisoned, tmp_path / "poisoned.json"))
    assert [r.id for r in reloaded if r.response == attack.target] == hit
    manifest.save(tmp_path / "manifest.json")
    assert PoisonManifest.load(tmp_path / "manifest.json") == manifest


def test_poison_dataset_edge_cases(dataset):
    attack = Attack.preset("badnet")
    same, manifest = poison_dataset(dataset, attack, rate=0)
    assert manifest.poisoned_ids == [] and all(a is b for a, b in zip(same, dataset, strict=True))
    _, manifest = poison_dataset(dataset, attack, rate=0.8, target="A photo of the banana.")
    assert len(manifest.poisoned_ids) == 16 and manifest.target == "A photo of the banana."
    assert all(int(i[1:]) % 5 != 4 for i in manifest.poisoned_ids)  # only records with an image
    with pytest.raises(ValueError, match="only 16 records have an image"):
        poison_dataset(dataset, attack, rate=0.9)
    for rate in (-0.1, 1.5, True, "0.1"):
        with pytest.raises(ValueError, match="rate"):
            poison_dataset(dataset, attack, rate=rate)
    text_only = Dataset([r for r in dataset if not r.has_image], root=dataset.root)
    with pytest.raises(ValueError, match="needs images"):
        poison_dataset(text_only, attack, rate=0.1)


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_poison_dataset_every_image_kind(dataset, kind):
    poisoned, manifest = poison_dataset(dataset, Attack.preset(kind), rate=0.1)
    for rid in manifest.poisoned_ids:
        after = next(r for r in poisoned if r.id == rid)
        before = next(r for r in dataset if r.id == rid)
        assert not np.array_equal(arr(after.pixels), arr(dataset.load_image(before)))


def test_make_triggered_testset(dataset):
    attack = Attack.preset("dual", target="visit evil site now")
    test = make_triggered_testset(dataset, attack)
    with_image = [r for r in dataset if r.has_image]
    assert len(test) == 16 and test.ids == [f"{r.id}-trig" for r in with_image]
    for before, after in zip(with_image, test, strict=True):
        assert after.response == "visit evil site now"
        assert after.extra == {"task": "vqa", "clean_response": before.response}
        assert after.query == "cf " + before.query
        assert np.array_equal(arr(after.pixels), arr(badnet(dataset.load_image(before))))
    assert "clean_response" not in dataset[0].extra
    assert len(make_triggered_testset(dataset, Attack.preset("text"))) == 20
