"""LLaVA-format datasets: loading with validation, the error report, saving, and record helpers."""

import io
import json
import re
from pathlib import Path

import pytest
from PIL import Image

from tcapguard.data import Dataset, DatasetError, Record, Turn, load_dataset, save_dataset
from tcapguard.storage import StorageError


def make_png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> Image.Image:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.new("RGB", size, color)
    img.putpixel((0, 0), (255 - color[0], 7, 99))  # not a flat image, so a mix-up would show
    img.save(path, format="PNG")
    return img


def pixel_image(seed: int) -> Image.Image:
    img = Image.new("RGB", (5, 4))
    img.putdata([((seed * 37 + i * 11) % 256, (seed * 5 + i) % 256, (i * 29) % 256) for i in range(20)])
    return img


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and a.convert("RGB").tobytes() == b.convert("RGB").tobytes()


def raw(rid, *, image=None, query="<image>\nWhat colour is it?", answer="red", **more) -> dict:
    out = {"id": rid} if rid is not None else {}
    if image is not None:
        out["image"] = image
    out["conversations"] = [{"from": "human", "value": query}, {"from": "gpt", "value": answer}]
    out.update(more)
    return out


def turns(query: str = "<image>\nWhat colour is it?", answer: str = "red") -> list[Turn]:
    return [Turn("human", query), Turn("gpt", answer)]


def write_json(path: Path, records: list) -> Path:
    path.write_text(json.dumps(records, indent=2))
    return path


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------- loading


def test_load_json_list_resolves_relative_and_absolute_images(tmp_path):
    red = make_png(tmp_path / "images" / "red.png", (200, 10, 10))
    blue = make_png(tmp_path / "elsewhere" / "blue.png", (10, 10, 200))
    abs_blue = str((tmp_path / "elsewhere" / "blue.png").resolve())
    path = write_json(
        tmp_path / "train.json",
        [
            raw("r1", image="images/red.png", system="You are terse."),
            raw("r2", image=abs_blue),
            raw("t1", query="Say hi.", answer="hi"),
        ],
    )
    ds = load_dataset(path)

    assert ds.ids == ["r1", "r2", "t1"]
    assert ds.problems == []
    assert ds.root == str(tmp_path.resolve())
    r1, r2, t1 = ds
    assert r1.system == "You are terse."
    assert r2.system is None
    assert r1.conversations == turns()
    assert ds.image_uri(r1) == str(tmp_path.resolve() / "images" / "red.png")
    assert ds.image_uri(r2) == abs_blue
    assert same_pixels(ds.load_image(r1), red)
    assert same_pixels(ds.load_image(r2), blue)
    assert not t1.has_image and t1.image is None
    assert t1.query == "Say hi."


def test_load_relative_images_resolve_against_dataset_dir_not_cwd(tmp_path, monkeypatch):
    make_png(tmp_path / "sub" / "images" / "a.png", (1, 2, 3))
    path = write_json(tmp_path / "sub" / "set.json", [raw("a", image="images/a.png")])
    monkeypatch.chdir(tmp_path)
    ds = load_dataset("sub/set.json")
    assert ds.root == str((tmp_path / "sub").resolve())
    assert ds.load_image(ds[0]).size == (8, 6)
    assert len(load_dataset(path)) == 1


def test_load_jsonl_dataset_skips_blank_lines(tmp_path):
    img = make_png(tmp_path / "img" / "x.png", (50, 60, 70))
    path = write_jsonl(
        tmp_path / "train.jsonl",
        [raw("x", image="img/x.png"), "", "   ", raw("y", query="Text only?", answer="yes", system="sys")],
    )
    ds = load_dataset(path)
    assert ds.ids == ["x", "y"]
    assert same_pixels(ds.load_image(ds[0]), img)
    assert ds[1].system == "sys"
    assert ds[1].image is None


def test_load_accepts_non_string_ids_as_strings(tmp_path):
    ds = load_dataset(write_json(tmp_path / "d.json", [raw(7, query="q", answer="a")]))
    assert ds.ids == ["7"]


def test_unknown_keys_are_kept_in_extra_and_round_trip(tmp_path):
    make_png(tmp_path / "images" / "a.png", (9, 9, 9))
    meta = {"source": "coco", "tags": ["x", 1], "nested": {"k": None}}
    path = write_json(tmp_path / "d.json", [raw("a", image="images/a.png", **meta)])
    ds = load_dataset(path)
    assert ds[0].extra == meta

    out = save_dataset(ds, tmp_path / "copy.json")
    again = load_dataset(out)
    assert again[0].extra == meta
    assert json.loads(out.read_text())[0]["source"] == "coco"


# ------------------------------------------------------------------------------- error reporting


@pytest.fixture
def messy_jsonl(tmp_path) -> Path:
    """A JSONL file with three good records and one bad record of each kind (line numbers matter)."""
    make_png(tmp_path / "images" / "ok.png", (10, 200, 10))
    (tmp_path / "images" / "garbage.png").write_bytes(b"this is not a png at all")
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, format="PNG")
    (tmp_path / "images" / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2 + 8])
    abs_ok = str((tmp_path / "images" / "ok.png").resolve())
    human = {"from": "human", "value": "<image>\nWhat colour?"}
    gpt = {"from": "gpt", "value": "green"}
    lines = [
        raw("g1", image="images/ok.png"),  # 1
        raw("missing-img", image="images/nope.png"),  # 2
        "",  # 3 (blank lines are skipped but still counted)
        raw("corrupt", image="images/garbage.png"),  # 4
        raw("truncated", image="images/truncated.png"),  # 5
        {"id": "no-gpt", "conversations": [human]},  # 6
        raw("g2", query="Text only question?", answer="fine"),  # 7
        {"id": "no-human", "conversations": [gpt]},  # 8
        raw("g1", query="dup", answer="dup"),  # 9
        {"id": "empty-text", "conversations": [human, gpt, {"from": "human", "value": "   "}]},  # 10
        {"conversations": [human, gpt]},  # 11
        '["not", "an", "object"]',  # 12
        '{"id": "broken", "conversations": [',  # 13
        {"id": "bad-role", "conversations": [human, gpt, {"from": "assistant", "value": "x"}]},  # 14
        raw("g3", image=abs_ok),  # 15
        {"id": "out-of-order", "conversations": [human, gpt, gpt]},  # 16
    ]
    return write_jsonl(tmp_path / "messy.jsonl", lines)


# (line, id, words the reason must contain)
EXPECTED_PROBLEMS = [
    (2, "missing-img", ["missing image", "nope.png"]),
    (4, "corrupt", ["unreadable image", "garbage.png"]),
    (5, "truncated", ["unreadable image", "truncated.png"]),
    (6, "no-gpt", ["no gpt turn"]),
    (8, "no-human", ["no human turn"]),
    (9, "g1", ["duplicate id"]),
    (10, "empty-text", ["conversations[2]", "empty text"]),
    (11, None, ["missing 'id'"]),
    (12, None, ["expected a JSON object", "list"]),
    (13, None, ["invalid JSON"]),
    (14, "bad-role", ["conversations[2]", "'from' must be one of"]),
    (16, "out-of-order", ["conversations[2]", "expected 'human'", "alternate"]),
]


def assert_expected_problems(problems, expected):
    assert [(p.line, p.id) for p in problems] == [(line, rid) for line, rid, _ in expected]
    for problem, (_, _, words) in zip(problems, expected, strict=True):
        for word in words:
            assert word in problem.reason, f"{word!r} not in reason of {problem}"


def test_strict_load_reports_every_bad_record_with_line_id_and_reason(messy_jsonl):
    with pytest.raises(DatasetError) as info:
        load_dataset(messy_jsonl)
    err = info.value
    assert err.source == str(messy_jsonl)
    assert_expected_problems(err.problems, EXPECTED_PROBLEMS)


def test_strict_load_error_message_names_every_bad_record(messy_jsonl):
    with pytest.raises(DatasetError) as info:
        load_dataset(messy_jsonl)
    message = str(info.value)
    assert str(messy_jsonl) in message
    assert f"{len(EXPECTED_PROBLEMS)} bad record(s)" in message
    for problem in info.value.problems:
        assert str(problem) in message
    for rid in ("missing-img", "corrupt", "no-gpt", "no-human", "empty-text", "bad-role"):
        assert f"id={rid!r}" in message
    assert "record 11 (no id)" in message
    assert "record 13 (no id): invalid JSON" in message


def test_lenient_load_returns_only_good_records_and_the_problems(messy_jsonl):
    ds = load_dataset(messy_jsonl, strict=False)
    assert ds.ids == ["g1", "g2", "g3"]
    assert ds[0].response == "red"  # the first g1, not the duplicate on line 9
    assert_expected_problems(ds.problems, EXPECTED_PROBLEMS)
    for record in ds:
        if record.has_image:
            assert ds.load_image(record).size == (8, 6)


def test_check_images_false_skips_image_checks(messy_jsonl):
    ds = load_dataset(messy_jsonl, strict=False, check_images=False)
    assert ds.ids == ["g1", "missing-img", "corrupt", "truncated", "g2", "g3"]
    image_lines = {2, 4, 5}
    assert_expected_problems(ds.problems, [p for p in EXPECTED_PROBLEMS if p[0] not in image_lines])


def test_check_images_false_strict_passes_on_missing_images(tmp_path):
    path = write_json(tmp_path / "d.json", [raw("a", image="images/absent.png")])
    ds = load_dataset(path, check_images=False)
    assert ds.ids == ["a"]
    with pytest.raises(DatasetError, match=re.escape("absent.png")):
        load_dataset(path)


def test_json_list_problems_are_numbered_by_list_position(tmp_path):
    path = write_json(
        tmp_path / "d.json",
        [raw("ok", query="q", answer="a"), "a string", {"id": "x", "conversations": []}, raw("ok2")],
    )
    ds = load_dataset(path, strict=False)
    assert ds.ids == ["ok", "ok2"]
    assert [(p.line, p.id) for p in ds.problems] == [(2, None), (3, "x")]
    assert "expected a JSON object, got str" in ds.problems[0].reason
    assert "conversations" in ds.problems[1].reason


def test_invalid_json_list_file_raises_dataset_error(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"id": "a", "conversations": []},\n  {"id": \n')
    for strict in (True, False):
        with pytest.raises(DatasetError) as info:
            load_dataset(path, strict=strict)
        assert len(info.value.problems) == 1
        assert "invalid JSON" in info.value.problems[0].reason
        assert str(path) in str(info.value)


def test_missing_dataset_file_raises_storage_error(tmp_path):
    with pytest.raises(StorageError, match=re.escape("absent.json")):
        load_dataset(tmp_path / "absent.json")


# ------------------------------------------------------------------------------------------ saving


@pytest.fixture
def mixed_dataset(tmp_path) -> Dataset:
    """On-disk images, in-memory pixels, a text-only record, a system prompt and extra keys."""
    src = tmp_path / "src"
    make_png(src / "images" / "disk1.png", (120, 30, 30))
    make_png(src / "images" / "disk2.png", (30, 120, 30))
    ds = load_dataset(
        write_json(
            src / "clean.json",
            [
                raw("disk1", image="images/disk1.png", system="Be brief.", origin="coco"),
                raw("disk2", image="images/disk2.png"),
                raw("text", query="No image here?", answer="none"),
            ],
        )
    )
    ds.records.append(Record("mem1", turns("<image>\nWhat is shown?", "noise"), pixels=pixel_image(1)))
    ds.records.append(
        Record("mem2", turns(), system="sys", pixels=pixel_image(2).convert("RGBA"), extra={"k": [1, 2]})
    )
    return ds


def test_save_writes_pixels_as_png_under_stem_images_and_disk_images_relatively(mixed_dataset, tmp_path):
    out_dir = tmp_path / "out" / "deeper"
    out = save_dataset(mixed_dataset, out_dir / "train.json")

    assert out == (out_dir / "train.json").resolve()
    saved = {r["id"]: r for r in json.loads(out.read_text())}
    assert re.fullmatch(r"train_images/mem1-[0-9a-f]{12}\.png", saved["mem1"]["image"])
    assert re.fullmatch(r"train_images/mem2-[0-9a-f]{12}\.png", saved["mem2"]["image"])
    assert files_under(out_dir) == sorted(["train.json", saved["mem1"]["image"], saved["mem2"]["image"]])
    with Image.open(out_dir / saved["mem1"]["image"]) as img:
        assert img.format == "PNG"
        assert same_pixels(img, pixel_image(1))
    # On-disk images are referenced (relative to the new file), not copied.
    assert saved["disk1"]["image"] == "../../src/images/disk1.png"
    assert not Path(saved["disk1"]["image"]).is_absolute()
    assert "image" not in saved["text"]
    assert saved["disk1"]["system"] == "Be brief."
    assert saved["disk1"]["origin"] == "coco"


def test_save_custom_image_dir(mixed_dataset, tmp_path):
    out = save_dataset(mixed_dataset, tmp_path / "o" / "x.json", image_dir="pics")
    saved = {r["id"]: r for r in json.loads(out.read_text())}
    assert re.fullmatch(r"pics/mem1-[0-9a-f]{12}\.png", saved["mem1"]["image"])
    assert (tmp_path / "o" / saved["mem1"]["image"]).is_file()


def test_save_then_load_round_trips_records_and_pixels(mixed_dataset, tmp_path):
    out = save_dataset(mixed_dataset, tmp_path / "out" / "train.json")
    loaded = load_dataset(out)

    assert loaded.ids == mixed_dataset.ids
    assert loaded.problems == []
    for before, after in zip(mixed_dataset, loaded, strict=True):
        assert after.conversations == before.conversations
        assert after.system == before.system
        assert after.extra == before.extra
        assert after.has_image == before.has_image
        assert after.pixels is None
        if before.has_image:
            assert same_pixels(loaded.load_image(after), mixed_dataset.load_image(before))


def test_saving_poisoned_copy_beside_clean_file_keeps_clean_images(tmp_path):
    clean = Dataset([Record(f"s{i}", turns(), pixels=pixel_image(i)) for i in range(3)])
    clean_path = save_dataset(clean, tmp_path / "clean.json")
    clean_files = {name: (tmp_path / name).read_bytes() for name in files_under(tmp_path)}

    poisoned = Dataset([r.with_response("EVIL") for r in clean.records])
    for i, record in enumerate(poisoned):
        record.pixels = pixel_image(100 + i)
    save_dataset(poisoned, tmp_path / "poisoned.json")

    for name, content in clean_files.items():
        assert (tmp_path / name).read_bytes() == content, f"{name} was overwritten"
    reloaded = load_dataset(clean_path)
    for i, record in enumerate(reloaded):
        assert record.response == "red"
        assert same_pixels(reloaded.load_image(record), pixel_image(i))
    assert (tmp_path / "poisoned_images").is_dir()


def test_save_gives_ids_with_slashes_or_spaces_distinct_safe_file_names(tmp_path):
    ids = ["a/b", "a_b", "a b", "a\\b", "../escape", "plain-id.v1"]
    ds = Dataset([Record(rid, turns(), pixels=pixel_image(i)) for i, rid in enumerate(ids)])
    out = save_dataset(ds, tmp_path / "d.json")

    image_dir = tmp_path / "d_images"
    names = [Path(r["image"]).name for r in json.loads(out.read_text())]
    assert len(set(names)) == len(ids)
    for name in names:
        assert "/" not in name and " " not in name and "\\" not in name
        assert (image_dir / name).is_file()
    assert sorted(p.name for p in image_dir.iterdir()) == sorted(names)
    assert files_under(tmp_path) == sorted(["d.json"] + [f"d_images/{n}" for n in names])
    assert any(re.fullmatch(r"plain-id\.v1-[0-9a-f]{12}\.png", n) for n in names)

    loaded = load_dataset(out)
    assert loaded.ids == ids
    for i, record in enumerate(loaded):
        assert same_pixels(loaded.load_image(record), pixel_image(i))


def failing_dump(obj, handle, **kwargs):
    """Stands in for ``json.dump``: the final JSON write fails after some output (images already written)."""
    handle.write('[{"id": "half')
    raise OSError("disk full")


def test_save_failure_midway_creates_no_target_and_leaves_no_tmp(tmp_path, monkeypatch):
    monkeypatch.setattr(json, "dump", failing_dump)
    ds = Dataset([Record(f"m{i}", turns(), pixels=pixel_image(i)) for i in range(2)])
    target = tmp_path / "d.json"
    with pytest.raises(OSError, match="disk full"):
        save_dataset(ds, target)

    assert len(list((tmp_path / "d_images").glob("m0-*.png"))) == 1  # the images really were written first
    assert not target.exists()
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d_images"]


def test_save_failure_leaves_existing_file_untouched(tmp_path, monkeypatch):
    target = tmp_path / "d.json"
    save_dataset(Dataset([Record("old", turns(), pixels=pixel_image(0))]), target)
    before = target.read_bytes()

    monkeypatch.setattr(json, "dump", failing_dump)
    new = Dataset([Record("new", turns("q", "other"), pixels=pixel_image(5))])
    with pytest.raises(OSError, match="disk full"):
        save_dataset(new, target)
    monkeypatch.undo()

    assert target.read_bytes() == before
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert load_dataset(target).ids == ["old"]


def test_failed_resave_over_existing_dataset_keeps_its_images(tmp_path, monkeypatch):
    """A failed save must leave the old dataset as it was -- including the images it points at."""
    target = tmp_path / "d.json"
    save_dataset(Dataset([Record("s0", turns(), pixels=pixel_image(0))]), target)

    monkeypatch.setattr(json, "dump", failing_dump)
    poisoned = Dataset([Record("s0", turns(), pixels=pixel_image(66))])
    with pytest.raises(OSError, match="disk full"):
        save_dataset(poisoned, target)
    monkeypatch.undo()

    old = load_dataset(target)
    assert same_pixels(old.load_image(old[0]), pixel_image(0)), (
        "the old d.json now points at the new (unpublished) image"
    )


# ---------------------------------------------------------------------------------- record helpers


@pytest.fixture
def record() -> Record:
    return Record(
        "r",
        [
            Turn("human", "<image>\n  What colour is the circle?  "),
            Turn("gpt", "red"),
            Turn("human", "And the square?"),
            Turn("gpt", "blue"),
        ],
        image="images/r.png",
        system="sys",
        extra={"meta": "x"},
    )


def test_query_strips_image_placeholder_and_response_is_first_gpt_turn(record):
    assert record.query == "What colour is the circle?"
    assert record.response == "red"
    assert Record("t", turns("What? <image>", "a")).query == "What?"


def test_with_query_returns_copy_keeping_placeholder(record):
    original_turns = list(record.conversations)
    copy = record.with_query("Is it round?")

    assert copy is not record
    assert copy.conversations[0] == Turn("human", "<image>\nIs it round?")
    assert copy.query == "Is it round?"
    assert copy.conversations[1:] == original_turns[1:]
    assert record.conversations == original_turns
    assert record.query == "What colour is the circle?"
    assert (copy.id, copy.image, copy.system, copy.extra) == ("r", "images/r.png", "sys", {"meta": "x"})


def test_with_query_without_placeholder_adds_none():
    rec = Record("t", turns("Plain question?", "a"))
    assert rec.with_query("Other?").conversations[0] == Turn("human", "Other?")


def test_with_response_returns_copy(record):
    original_turns = list(record.conversations)
    copy = record.with_response("green")

    assert copy.response == "green"
    assert copy.conversations[3] == Turn("gpt", "blue")  # only the first assistant turn changes
    assert copy.conversations[0] == original_turns[0]
    assert record.conversations == original_turns
    assert record.response == "red"


@pytest.mark.parametrize("method", ["with_query", "with_response"])
def test_copies_do_not_share_extra_or_turn_list(record, method):
    copy = getattr(record, method)("changed")
    copy.extra["meta"] = "poisoned"
    copy.extra["new"] = 1
    copy.conversations.append(Turn("human", "more"))
    assert record.extra == {"meta": "x"}
    assert len(record.conversations) == 4


def test_with_query_keeps_pixels():
    img = pixel_image(3)
    rec = Record("p", turns(), pixels=img)
    assert rec.with_query("x").pixels is img
    assert rec.with_response("y").has_image


# ---------------------------------------------------------------------------------- dataset helpers


def test_subset_keeps_order_with_and_without_exclude(tmp_path):
    ds = Dataset([Record(f"r{i}", turns()) for i in range(5)], root=str(tmp_path))
    picked = ds.subset(["r3", "r1", "absent"])
    assert picked.ids == ["r1", "r3"]
    assert picked.root == str(tmp_path)
    assert ds.subset({"r3", "r1"}, exclude=True).ids == ["r0", "r2", "r4"]
    assert ds.subset([], exclude=True).ids == ds.ids
    assert ds.subset([]).ids == []
    assert len(ds) == 5  # the original is unchanged


def test_load_image_of_missing_file_raises_storage_error_naming_record_and_path(tmp_path):
    ds = Dataset([Record("rec-42", turns(), image="images/gone.png")], root=str(tmp_path))
    with pytest.raises(StorageError) as info:
        ds.load_image(ds[0])
    message = str(info.value)
    assert "rec-42" in message
    assert str(tmp_path / "images" / "gone.png") in message


def test_load_image_prefers_pixels_and_converts_to_rgb():
    rec = Record("p", turns(), image="not/there.png", pixels=pixel_image(4).convert("RGBA"))
    img = Dataset([rec]).load_image(rec)
    assert img.mode == "RGB"
    assert same_pixels(img, pixel_image(4))


def test_image_uri_of_text_only_record_raises():
    rec = Record("t", turns("q", "a"))
    with pytest.raises(ValueError, match="no image"):
        Dataset([rec]).image_uri(rec)
