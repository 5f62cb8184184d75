"""Local-path storage, the s3:// URI helpers and S3 failures that need no server (the rest: test_s3.py)."""

import os
import socket
import time

import pytest

from tcapguard.storage import (
    MissingObjectError,
    StorageError,
    atomic_write,
    download_file,
    download_prefix,
    exists,
    is_s3,
    join,
    publish_directory,
    read_bytes,
    split_s3,
    upload_directory,
    upload_file,
    write_bytes,
)


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


def test_join_uses_slashes_on_s3_and_the_os_locally(tmp_path):
    assert join("s3://bucket/prefix/", "a", "/b.json") == "s3://bucket/prefix/a/b.json"
    assert join(tmp_path, "a", "b.json") == str(tmp_path / "a" / "b.json")


def test_exists_and_missing_local_file_error_type(tmp_path):
    assert not exists(tmp_path / "nope")
    write_bytes(tmp_path / "yes", b"1")
    assert exists(tmp_path / "yes")
    with pytest.raises(MissingObjectError):
        read_bytes(tmp_path / "nope")


def test_local_file_and_directory_copies_are_atomic_round_trips(tmp_path):
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "a.bin").write_bytes(b"a" * 10)
    (src / "sub" / "b.txt").write_text("b")
    upload_file(src / "a.bin", tmp_path / "out" / "a.bin")
    assert download_file(tmp_path / "out" / "a.bin", tmp_path / "back.bin").read_bytes() == b"a" * 10

    manifest = upload_directory(src, tmp_path / "published")
    assert manifest["files"] == {"a.bin": 10, "sub/b.txt": 1}
    copy = download_prefix(tmp_path / "published", tmp_path / "copy")
    assert sorted(p.relative_to(copy).as_posix() for p in copy.rglob("*")) == ["a.bin", "sub", "sub/b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.bin", "copy", "out", "published", "src"]

    with pytest.raises(MissingObjectError, match="no such directory"):
        upload_directory(tmp_path / "absent", tmp_path / "x")
    with pytest.raises(MissingObjectError, match="no such file"):
        download_file(tmp_path / "absent.bin", tmp_path / "y.bin")


def test_local_publish_directory_failure_keeps_the_old_directory(tmp_path):
    final = tmp_path / "final"
    publish_directory(final, lambda tmp: (tmp / "v").write_text("1"))

    def failing(tmp):
        (tmp / "v").write_text("2")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        publish_directory(final, failing)
    assert (final / "v").read_text() == "1"
    assert [p.name for p in tmp_path.iterdir()] == ["final"]


@pytest.fixture
def aws_env(monkeypatch, tmp_path):
    """An AWS environment with no real account behind it (no ~/.aws, no instance metadata service)."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "TCAPGUARD_S3_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    return monkeypatch


def test_unreachable_endpoint_fails_within_seconds_and_names_it(aws_env):
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    aws_env.setenv("AWS_ENDPOINT_URL", endpoint)
    aws_env.setenv("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")
    aws_env.setenv("AWS_SECRET_ACCESS_KEY", "UnreachableSecret123")
    started = time.monotonic()
    with pytest.raises(StorageError) as info:
        read_bytes("s3://bucket/key.json")
    # Three attempts with short back-off; botocore's defaults (60 s timeouts, legacy retries) take minutes
    # against a black-holed address. The bound is loose: this checks the configuration, not speed.
    assert time.monotonic() - started < 20
    message = str(info.value)
    assert "cannot read s3://bucket/key.json: cannot reach" in message and endpoint in message
    assert "UnreachableSecret123" not in message


def test_missing_credentials_say_what_to_set(aws_env):
    aws_env.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(StorageError, match="no AWS credentials found: set AWS_ACCESS_KEY_ID"):
        read_bytes("s3://bucket/key.json")


def test_bad_timeout_setting_is_named(aws_env):
    aws_env.setenv("TCAPGUARD_S3_CONNECT_TIMEOUT", "soon")
    with pytest.raises(StorageError, match="TCAPGUARD_S3_CONNECT_TIMEOUT must be a number, got 'soon'"):
        read_bytes("s3://bucket/key.json")
