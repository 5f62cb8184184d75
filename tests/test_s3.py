"""tcapguard.storage, datasets, models and MLflow against a real S3 server (Ceph RGW, tests/s3server.py).

RGW checks SigV4 signatures and runs real multipart uploads, so wrong keys and part handling are tested
for real. Without Ceph installed these tests skip locally and fail in CI (``make ceph`` installs it).
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tcapguard.data import DatasetError, load_dataset
from tcapguard.models import ModelLoadError, load_model
from tcapguard.storage import (
    MARKER,
    MIB,
    MissingObjectError,
    StorageError,
    default_transfer_config,
    download_file,
    download_prefix,
    exists,
    mark_complete,
    publish_directory,
    read_bytes,
    read_manifest,
    split_s3,
    upload_directory,
    upload_file,
    write_bytes,
)

SMALL_PARTS = default_transfer_config(multipart_threshold=5 * MIB, multipart_chunksize=5 * MIB)


def _keys(server, uri: str) -> list[str]:
    bucket, prefix = split_s3(uri)
    listing = server.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- bytes and files ----------------------------------------------------------------------------------


def test_bytes_round_trip_and_exists(s3_bucket):
    uri = f"{s3_bucket}/deep/prefix/blob 01.bin"
    payload = os.urandom(3000)
    assert not exists(uri)
    write_bytes(uri, payload)
    assert read_bytes(uri) == payload
    assert exists(uri)
    write_bytes(uri, b"replaced")
    assert read_bytes(uri) == b"replaced"


def test_large_file_goes_up_in_parts_and_comes_back_whole(s3_env, s3_bucket, tmp_path):
    big = tmp_path / "weights.bin"
    big.write_bytes(os.urandom(12 * MIB + 123))
    uri = f"{s3_bucket}/model/weights.bin"
    upload_file(big, uri, config=SMALL_PARTS)
    bucket, key = split_s3(uri)
    etag = s3_env.client().head_object(Bucket=bucket, Key=key)["ETag"]
    assert etag.strip('"').endswith("-3")  # a multipart upload of three 5 MiB parts, completed by RGW

    out = download_file(uri, tmp_path / "copy" / "weights.bin", config=SMALL_PARTS)
    assert out.read_bytes() == big.read_bytes()
    assert [p.name for p in out.parent.iterdir()] == ["weights.bin"]  # no temporary file left


def test_upload_of_missing_local_file_and_to_a_prefix_are_refused(s3_bucket, tmp_path):
    with pytest.raises(MissingObjectError, match="no such file"):
        upload_file(tmp_path / "absent.bin", f"{s3_bucket}/x.bin")
    (tmp_path / "a.bin").write_bytes(b"a")
    with pytest.raises(StorageError, match="names a prefix"):
        upload_file(tmp_path / "a.bin", f"{s3_bucket}/dir/")


# --- errors -------------------------------------------------------------------------------------------


def test_missing_bucket_and_missing_key_name_the_uri(s3_bucket, tmp_path):
    missing_key = f"{s3_bucket}/no/such/key.json"
    with pytest.raises(MissingObjectError) as info:
        read_bytes(missing_key)
    assert missing_key in str(info.value) and "no such object" in str(info.value)

    with pytest.raises(MissingObjectError) as info:
        download_file(missing_key, tmp_path / "out.json")
    assert missing_key in str(info.value) and "no such object" in str(info.value)
    assert list(tmp_path.iterdir()) == []

    missing_bucket = "s3://tcapguard-no-such-bucket/data.json"
    for call in (
        lambda: read_bytes(missing_bucket),
        lambda: write_bytes(missing_bucket, b"x"),
        lambda: download_file(missing_bucket, tmp_path / "out.json"),
    ):
        with pytest.raises(MissingObjectError) as info:
            call()
        assert missing_bucket in str(info.value)
        assert "bucket 'tcapguard-no-such-bucket' does not exist" in str(info.value)


def test_wrong_secret_is_refused_without_revealing_any_secret(
    s3_env, s3_bucket, tmp_path, monkeypatch, caplog
):
    uri = f"{s3_bucket}/secret-test.bin"
    write_bytes(uri, b"payload")
    (tmp_path / "f.bin").write_bytes(b"data")
    wrong = "WrongSecretValue1234567890"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    caplog.set_level(logging.DEBUG)
    calls = {
        "read": lambda: read_bytes(uri),
        "write": lambda: write_bytes(uri, b"x"),
        "upload to": lambda: upload_file(tmp_path / "f.bin", uri),
        "download": lambda: download_file(uri, tmp_path / "out.bin"),
        "check": lambda: exists(uri),  # fails closed: "cannot tell" is not "absent"
    }
    for action, call in calls.items():
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert not isinstance(info.value, MissingObjectError)
        assert f"cannot {action} {uri}" in message
        assert "rejected the credentials (SignatureDoesNotMatch)" in message
        assert wrong not in message and s3_env.secret_key not in message
    assert wrong not in caplog.text and s3_env.secret_key not in caplog.text
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    assert read_bytes(uri) == b"payload"  # the object was never changed


def test_unknown_access_key_is_refused(s3_bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "NOSUCHKEYID")
    with pytest.raises(StorageError, match="rejected the credentials \\(InvalidAccessKeyId\\)"):
        read_bytes(f"{s3_bucket}/x")


# --- directories: atomic publication ------------------------------------------------------------------


def _sample_dir(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "big.safetensors").write_bytes(os.urandom(11 * MIB))
    (root / "sub" / "deeper" / "empty.txt").write_bytes(b"")
    return root


def test_directory_round_trip_with_multipart_and_marker_last(s3_env, s3_bucket, tmp_path):
    src = _sample_dir(tmp_path / "src")
    uri = f"{s3_bucket}/runs/7/model"
    manifest = upload_directory(src, uri, config=SMALL_PARTS)
    assert manifest["files"] == {k: len(v) for k, v in _tree(src).items()}
    prefix = split_s3(uri)[1]
    assert _keys(s3_env, uri) == sorted(
        f"{prefix}/{k}" for k in [MARKER, "config.json", "sub/big.safetensors", "sub/deeper/empty.txt"]
    )
    assert read_manifest(uri)["id"] == manifest["id"]

    dest = download_prefix(f"{uri}/", tmp_path / "dest", config=SMALL_PARTS)
    assert _tree(dest) == _tree(src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest", "src"]  # no temporary directory


def test_half_published_directory_is_not_read(s3_env, s3_bucket, tmp_path):
    """Objects uploaded without the marker (an upload that died, or one still running) are refused."""
    uri = f"{s3_bucket}/half"
    bucket, prefix = split_s3(uri)
    client = s3_env.client()
    client.put_object(Bucket=bucket, Key=f"{prefix}/config.json", Body=b"{}")
    client.put_object(Bucket=bucket, Key=f"{prefix}/weights.bin", Body=b"w" * 100)
    with pytest.raises(MissingObjectError) as info:
        download_prefix(uri, tmp_path / "dest")
    assert f"{uri} is not a published directory: no completion marker {uri}/{MARKER}" in str(info.value)
    assert not (tmp_path / "dest").exists()

    mark_complete(uri)  # the other tool's upload has finished: now it may be read
    assert _tree(download_prefix(uri, tmp_path / "dest")) == {"config.json": b"{}", "weights.bin": b"w" * 100}


def test_republication_replaces_the_directory_and_ignores_stray_objects(s3_env, s3_bucket, tmp_path):
    uri = f"{s3_bucket}/model"
    first = tmp_path / "v1"
    (first / "old").mkdir(parents=True)
    (first / "old" / "stale.bin").write_bytes(b"stale")
    (first / "config.json").write_text("v1")
    upload_directory(first, uri)
    second = tmp_path / "v2"
    second.mkdir()
    (second / "config.json").write_text("version two")
    upload_directory(second, uri)

    assert f"{split_s3(uri)[1]}/old/stale.bin" in _keys(s3_env, uri)  # left in the bucket ...
    assert _tree(download_prefix(uri, tmp_path / "dest")) == {"config.json": b"version two"}  # ... not read


def test_directory_that_changed_after_marking_is_refused(s3_env, s3_bucket, tmp_path):
    uri = f"{s3_bucket}/changed"
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.bin").write_bytes(b"12345")
    upload_directory(src, uri)
    bucket, prefix = split_s3(uri)
    s3_env.client().put_object(Bucket=bucket, Key=f"{prefix}/a.bin", Body=b"123")  # rewritten in place
    with pytest.raises(StorageError, match="has 3 bytes but its manifest says 5"):
        download_prefix(uri, tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_publish_directory_to_s3_publishes_only_a_finished_build(s3_env, s3_bucket, tmp_path):
    uri = f"{s3_bucket}/published"

    def failing(tmp: Path) -> None:
        (tmp / "config.json").write_text("partial")
        raise RuntimeError("build died")

    with pytest.raises(RuntimeError, match="build died"):
        publish_directory(uri, failing)
    assert _keys(s3_env, uri) == []

    assert publish_directory(uri, lambda tmp: (tmp / "config.json").write_text("done")) == uri
    assert _tree(download_prefix(uri, tmp_path / "dest")) == {"config.json": b"done"}


def test_upload_directory_to_missing_bucket_names_it_and_leaves_nothing(s3_env, tmp_path):
    src = _sample_dir(tmp_path / "src")
    with pytest.raises(MissingObjectError, match="bucket 'tcapguard-absent' does not exist"):
        upload_directory(src, "s3://tcapguard-absent/dir")


# --- datasets, models -----------------------------------------------------------------------------------


def _png(color: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="PNG")
    return buf.getvalue()


def test_load_dataset_from_s3_with_s3_images(s3_bucket):
    write_bytes(f"{s3_bucket}/data/images/red.png", _png("red"))
    write_bytes(f"{s3_bucket}/shared/blue.png", _png("blue"))
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    records = [
        {"id": "r", "image": "images/red.png", "conversations": turns},  # relative to the dataset file
        {"id": "b", "image": f"{s3_bucket}/shared/blue.png", "conversations": turns},  # absolute s3://
        {"id": "t", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ]
    write_bytes(f"{s3_bucket}/data/train.json", json.dumps(records).encode())

    dataset = load_dataset(f"{s3_bucket}/data/train.json")
    assert dataset.ids == ["r", "b", "t"]
    assert dataset.image_uri(dataset[0]) == f"{s3_bucket}/data/images/red.png"
    assert dataset.load_image(dataset[0]).getpixel((0, 0)) == (255, 0, 0)
    assert dataset.load_image(dataset[1]).getpixel((0, 0)) == (0, 0, 255)

    records[1]["image"] = f"{s3_bucket}/shared/missing.png"
    write_bytes(f"{s3_bucket}/data/broken.json", json.dumps(records).encode())
    with pytest.raises(DatasetError, match=f"missing image {s3_bucket}/shared/missing.png"):
        load_dataset(f"{s3_bucket}/data/broken.json")


def test_load_dataset_with_s3_images_and_a_wrong_secret_stops_at_the_first_image(
    s3_bucket, tmp_path, monkeypatch
):
    """Bad credentials are not "missing images": the load fails at once, naming the image and the cause."""
    write_bytes(f"{s3_bucket}/img.png", _png("red"))
    turns = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    records = [{"id": str(i), "image": f"{s3_bucket}/img.png", "conversations": turns} for i in range(5)]
    (tmp_path / "train.json").write_text(json.dumps(records))
    assert len(load_dataset(tmp_path / "train.json")) == 5
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "WrongSecretValue1234567890")
    with pytest.raises(
        StorageError, match=f"cannot read {s3_bucket}/img.png: the server rejected the credentials"
    ):
        load_dataset(tmp_path / "train.json")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from tcapguard.tiny import TinyMLLMConfig, build_tiny_mllm

    config = TinyMLLMConfig(family="llava", text_layers=1, vision_layers=1)
    return build_tiny_mllm(config, tmp_path_factory.mktemp("tiny"), corpus=["What is it? a red circle"])


def test_load_model_from_s3_reads_the_cache_until_republished(
    s3_env, s3_bucket, tiny_model, tmp_path, monkeypatch
):
    monkeypatch.setenv("TCAPGUARD_CACHE", str(tmp_path / "cache"))
    uri = f"{s3_bucket}/models/tiny"
    upload_directory(tiny_model, uri)
    model, _ = load_model(uri)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    cached = list((tmp_path / "cache" / "models").iterdir())
    assert len(cached) == 1

    bucket, prefix = split_s3(uri)
    s3_env.client().delete_object(Bucket=bucket, Key=f"{prefix}/model.safetensors")
    load_model(f"{uri}/")  # the weights are gone from S3, so this load can only come from the cache

    upload_directory(tiny_model, uri)  # republished: a new copy is downloaded
    load_model(uri)
    assert len(list((tmp_path / "cache" / "models").iterdir())) == 2

    s3_env.client().put_object(Bucket=bucket, Key="models/half/weights.bin", Body=b"w")
    with pytest.raises(ModelLoadError, match=f"{s3_bucket}/models/half is not a published directory"):
        load_model(f"{s3_bucket}/models/half")
    mark_complete(f"{s3_bucket}/models/half")
    with pytest.raises(ModelLoadError, match=r"holds no config\.json, so it is not a saved model"):
        load_model(f"{s3_bucket}/models/half")


# --- MLflow --------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_mlflow_server_puts_artifacts_in_s3(s3_env, s3_bucket, tmp_path, monkeypatch):
    """A real ``mlflow server`` proxies artifacts to RGW; the client holds no S3 credentials."""
    from mlflow import MlflowClient

    port = _free_port()
    log = (tmp_path / "mlflow.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", f"{s3_bucket}/mlflow"],
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "mlflow server did not answer /health in 60 s"
                time.sleep(0.2)
        for name in [n for n in os.environ if n.startswith("AWS_") or n == "MLFLOW_S3_ENDPOINT_URL"]:
            monkeypatch.delenv(name)  # proxied artifacts: the client needs no storage credentials
        tracking = MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        run = tracking.create_run(tracking.create_experiment("s3-artifacts"))
        (tmp_path / "report.json").write_text('{"asr": 0.02}')
        tracking.log_artifact(run.info.run_id, str(tmp_path / "report.json"), artifact_path="reports")
        tracking.set_terminated(run.info.run_id)

        client = s3_env.client()
        bucket, _ = split_s3(s3_bucket)
        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", [])]
        [key] = [k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/reports/report.json")]
        assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b'{"asr": 0.02}'
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


def _deny_puts(server, bucket_uri: str, key_pattern: str) -> None:
    """A real bucket policy that refuses uploads to keys matching ``key_pattern`` (for every user)."""
    bucket = split_s3(bucket_uri)[0]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Deny",
                "Principal": "*",
                "Action": "s3:PutObject",
                "Resource": f"arn:aws:s3:::{bucket}/{key_pattern}",
            }
        ],
    }
    server.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))


def test_denied_upload_midway_publishes_nothing_and_cleans_up(s3_env, s3_bucket, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("a.bin", "b.bin", "zz-denied.bin"):
        (src / name).write_bytes(name.encode())
    uri = f"{s3_bucket}/run"
    _deny_puts(s3_env, s3_bucket, "run/zz-*")
    with pytest.raises(StorageError) as info:
        upload_directory(src, uri)
    assert f"cannot upload to {uri}: access denied (AccessDenied)" in str(info.value)
    assert _keys(s3_env, uri) == []  # the files that did go up were removed, and there is no marker
    with pytest.raises(MissingObjectError, match="not a published directory"):
        download_prefix(uri, tmp_path / "dest")
