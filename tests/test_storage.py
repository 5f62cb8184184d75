"""Local-path storage and the pure s3:// URI helpers (S3 itself is tested against a real server)."""

import pytest

from tcapguard.storage import StorageError, atomic_write, is_s3, read_bytes, split_s3, write_bytes


def test_is_s3_only_for_s3_scheme(tmp_path):
    assert is_s3("s3://bucket/key")
    assert not is_s3("/data/set.json")
    assert not is_s3("relative/s3://not-a-uri")
    assert not is_s3(tmp_path / "x.json")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/key.json", ("bucket", "key.json")),
        ("s3://bucket/deep/prefix/img 01.png", ("bucket", "deep/prefix/img 01.png")),
        ("s3://bucket/", ("bucket", "")),
        ("s3://bucket", ("bucket", "")),
    ],
)
def test_split_s3_parses_bucket_and_key(uri, expected):
    assert split_s3(uri) == expected


@pytest.mark.parametrize("uri", ["/local/path.json", "bucket/key", "http://bucket/key", "s3:/bucket/key"])
def test_split_s3_rejects_non_s3_uri(uri):
    with pytest.raises(ValueError, match="not an s3:// URI") as info:
        split_s3(uri)
    assert uri in str(info.value)


@pytest.mark.parametrize("uri", ["s3://", "s3:///key.json"])
def test_split_s3_rejects_uri_without_bucket(uri):
    with pytest.raises(ValueError, match="without a bucket"):
        split_s3(uri)


def test_write_bytes_read_bytes_round_trip_creates_parent_dirs(tmp_path):
    target = tmp_path / "a" / "b" / "blob.bin"
    payload = bytes(range(256)) * 4
    write_bytes(target, payload)
    assert read_bytes(target) == payload
    assert read_bytes(str(target)) == payload
    assert sorted(p.name for p in target.parent.iterdir()) == ["blob.bin"]  # no temp file left


def test_write_bytes_replaces_existing_content(tmp_path):
    target = tmp_path / "blob.bin"
    write_bytes(target, b"old content that is longer")
    write_bytes(target, b"new")
    assert read_bytes(target) == b"new"


def test_read_bytes_of_missing_path_raises_storage_error_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "missing.json"
    with pytest.raises(StorageError) as info:
        read_bytes(missing)
    assert str(missing) in str(info.value)


def test_atomic_write_publishes_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_write(target, "w") as handle:
        handle.write("hello")
        assert not target.exists()  # nothing visible while writing
    assert target.read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_exception_leaves_no_temp_and_no_target(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="boom"), atomic_write(target) as handle:
        handle.write(b"partial")
        raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_exception_leaves_existing_file_untouched(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"original")
    with pytest.raises(KeyboardInterrupt), atomic_write(target) as handle:
        handle.write(b"partial")
        raise KeyboardInterrupt
    assert target.read_bytes() == b"original"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]
