"""Read and publish files and directories at a local path or an ``s3://`` URI.

S3 goes through boto3 with the standard AWS chain for endpoint, region and credentials
(``AWS_ENDPOINT_URL``/``AWS_ENDPOINT_URL_S3``, ``AWS_ACCESS_KEY_ID``..., ``AWS_PROFILE``, config files,
instance roles). Set ``TCAPGUARD_S3_PATH_STYLE=1`` for S3-compatible servers that need path-style
addressing (Ceph RGW, MinIO). Clients fail fast: a 3 s connect timeout and 3 attempts in all
(``TCAPGUARD_S3_CONNECT_TIMEOUT``, ``TCAPGUARD_S3_READ_TIMEOUT``, ``AWS_MAX_ATTEMPTS``,
``AWS_RETRY_MODE`` override them), so an unreachable endpoint is an error within seconds.

Publication is atomic, so a reader never sees a half-written artifact:

* a local file is written to a temporary sibling and renamed; a local directory is built in a
  temporary sibling directory and renamed;
* an S3 object becomes visible only when its (single or multipart) upload completes;
* an S3 *directory* (every object under a prefix) is published by first deleting its completion
  marker ``<prefix>/_tcapguard_complete.json``, then uploading the objects, then writing the marker
  last. The marker is a manifest (relative path -> size, a publication id); readers require it and
  download exactly the files it lists, checking their sizes. A directory whose upload died midway has
  no marker and is refused, and stray objects under the prefix are never mixed in. Directories
  uploaded by other tools (``aws s3 sync``) are marked readable with :func:`mark_complete`.

Errors are :class:`StorageError` (:class:`MissingObjectError` for a missing bucket or key) naming the
URI and the cause (missing bucket, missing key, denied access or bad signature, unreachable endpoint,
no credentials). Credentials never appear in messages or logs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from boto3.s3.transfer import TransferConfig
    from botocore.client import BaseClient

logger = logging.getLogger(__name__)

MARKER = "_tcapguard_complete.json"
MANIFEST_FORMAT = "tcapguard-directory/1"
MIB = 1024 * 1024
_ENV_PREFIXES = ("AWS_", "TCAPGUARD_S3_")


class StorageError(RuntimeError):
    """An object could not be read or written; the message names the URI and the cause."""


class MissingObjectError(StorageError):
    """The bucket or the object does not exist (as opposed to denied, unreachable, or malformed)."""


def is_s3(uri: str | os.PathLike) -> bool:
    return str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """``s3://bucket/key`` -> ``(bucket, key)``."""
    if not is_s3(uri):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URI without a bucket: {uri!r}")
    return bucket, key


def join(base: str | os.PathLike, *parts: str) -> str:
    """``base/part/...`` for a local path or an ``s3://`` prefix (``/`` separators on S3)."""
    if is_s3(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


# --- the client -------------------------------------------------------------------------------------


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError:
        raise StorageError(f"{name} must be a number, got {raw!r}") from None


def s3_client() -> BaseClient:
    """A boto3 S3 client from the standard AWS chain, built once per distinct AWS/TCAPGUARD_S3 env.

    Caching matters: building a client costs tens of milliseconds and a dataset reads one image per
    record. Keying on the environment keeps a changed endpoint or key from reusing a stale client.
    """
    snapshot = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIXES)))
    return _client_for(snapshot)


@functools.lru_cache(maxsize=8)
def _client_for(snapshot: tuple[tuple[str, str], ...]) -> BaseClient:
    import boto3
    from botocore.config import Config

    env = dict(snapshot)
    path_style = env.get("TCAPGUARD_S3_PATH_STYLE", "").lower() in {"1", "true", "yes"}
    config = Config(
        connect_timeout=_env_number("TCAPGUARD_S3_CONNECT_TIMEOUT", 3.0),
        read_timeout=_env_number("TCAPGUARD_S3_READ_TIMEOUT", 60.0),
        retries={
            "mode": env.get("AWS_RETRY_MODE", "standard"),
            "total_max_attempts": int(_env_number("AWS_MAX_ATTEMPTS", 3)),
        },
        max_pool_connections=16,
        s3={"addressing_style": "path"} if path_style else None,
    )
    session = boto3.session.Session()
    client = session.client("s3", config=config)
    credentials = session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        _SECRETS.update(s for s in (frozen.secret_key, frozen.token) if s and len(s) >= 4)
    return client


_SECRETS: set[str] = set()  # secret keys and session tokens seen by s3_client, scrubbed from messages


def _redact(text: str) -> str:
    for secret in _SECRETS:
        text = text.replace(secret, "***")
    return text


def default_transfer_config(**overrides: Any) -> TransferConfig:
    """boto3's managed-transfer settings: multipart above 64 MiB in 64 MiB parts, 8 threads.

    64 MiB parts keep a 100 GB checkpoint under S3's 10,000-part limit; pass ``overrides`` (any
    ``TransferConfig`` field) to change one.
    """
    from boto3.s3.transfer import TransferConfig

    settings = {"multipart_threshold": 64 * MIB, "multipart_chunksize": 64 * MIB, "max_concurrency": 8}
    return TransferConfig(**(settings | overrides))


_DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_BAD_KEY = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "TokenRefreshRequired",
}


def _endpoint() -> str:
    try:
        return s3_client().meta.endpoint_url
    except Exception:
        return "the S3 endpoint"


def _bucket_exists(bucket: str) -> bool | None:
    """True/False where the server says so; None where it cannot tell (denied, unreachable)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        return False if code in {"404", "NoSuchBucket", "NotFound"} else None
    except BotoCoreError:
        return None
    return True


def _reason_for_403(bucket: str, key: str) -> str | None:
    """The error code behind a bare 403 (HEAD responses have no body): a one-byte GET tells.

    It needs the same permission as the HEAD, so it only names the reason (bad secret, unknown key,
    policy) that the HEAD could not carry.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        if key:
            s3_client().get_object(Bucket=bucket, Key=key, Range="bytes=0-0")
        else:
            s3_client().list_objects_v2(Bucket=bucket, MaxKeys=1)
    except ClientError as err:
        code = str(err.response.get("Error", {}).get("Code", ""))
        return code if code in _BAD_KEY | _DENIED else None  # e.g. not NoSuchKey for a prefix URI
    except BotoCoreError:
        return None
    return None


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _translate(action: str, uri: str, err: BaseException) -> StorageError:
    """A :class:`StorageError` for a boto3/botocore failure on ``uri``, saying what to check."""
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        HTTPClientError,
        NoCredentialsError,
        PartialCredentialsError,
    )

    known = (ClientError, ConnectionError, HTTPClientError, NoCredentialsError, PartialCredentialsError)
    cause = next((e for e in _chain(err) if isinstance(e, known)), err)
    if isinstance(cause, ClientError):
        info = cause.response.get("Error", {})
        code = str(info.get("Code", "unknown"))
        bucket, key = split_s3(uri)
        if code in {"403", "Forbidden"}:
            code = _reason_for_403(bucket, key) or code
        if code in {"404", "NotFound", "NoSuchKey", "NoSuchBucket"}:
            if code == "NoSuchBucket" or _bucket_exists(bucket) is False:
                return MissingObjectError(f"cannot {action} {uri}: bucket {bucket!r} does not exist")
            return MissingObjectError(f"cannot {action} {uri}: no such object")
        if code in _BAD_KEY:
            return StorageError(
                f"cannot {action} {uri}: the server rejected the credentials ({code}): check the access "
                "key id and secret key in the AWS environment or profile"
            )
        if code in _DENIED:
            return StorageError(f"cannot {action} {uri}: access denied ({code}): check the bucket policy")
        message = info.get("Message") or ""
        return StorageError(_redact(f"cannot {action} {uri}: S3 error {code} {message}".rstrip()))
    if isinstance(cause, NoCredentialsError | PartialCredentialsError):
        return StorageError(
            f"cannot {action} {uri}: no AWS credentials found: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
        )
    if isinstance(cause, ConnectionError | HTTPClientError):
        return StorageError(
            _redact(
                f"cannot {action} {uri}: cannot reach {_endpoint()} ({type(cause).__name__}): check "
                "AWS_ENDPOINT_URL and the network"
            )
        )
    return StorageError(_redact(f"cannot {action} {uri}: {type(err).__name__}: {err}"))


@contextmanager
def _s3_errors(action: str, uri: str) -> Iterator[None]:
    from boto3.exceptions import Boto3Error
    from botocore.exceptions import BotoCoreError, ClientError
    from s3transfer.exceptions import S3DownloadFailedError, S3UploadFailedError

    try:
        yield
    except (ClientError, BotoCoreError, Boto3Error, S3UploadFailedError, S3DownloadFailedError) as err:
        raise _translate(action, uri, err) from err


# --- bytes ------------------------------------------------------------------------------------------


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The content at ``uri``; :class:`StorageError` naming the URI if it is missing or unreadable."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        with _s3_errors("read", str(uri)):
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        return Path(uri).read_bytes()
    except FileNotFoundError as err:
        raise MissingObjectError(f"cannot read {uri}: no such file") from err
    except OSError as err:
        raise StorageError(f"cannot read {uri}: {err.strerror or err}") from err


def exists(uri: str | os.PathLike) -> bool:
    """Whether a file/object is at ``uri``; raises (rather than answering False) when it cannot tell."""
    if not is_s3(uri):
        return Path(uri).is_file()
    bucket, key = split_s3(str(uri))
    try:
        with _s3_errors("check", str(uri)):
            s3_client().head_object(Bucket=bucket, Key=key)
    except MissingObjectError:
        return False
    return True


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of local ``path`` for writing; rename it onto ``path`` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; published files get the usual permissions
    try:
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    """Publish ``data`` at ``uri`` atomically (S3: one PUT, visible only once complete)."""
    if is_s3(uri):
        bucket, key = split_s3(str(uri))
        with _s3_errors("write", str(uri)):
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        return
    with atomic_write(uri) as handle:
        handle.write(data)


# --- files ------------------------------------------------------------------------------------------


def _local_file(path: str | os.PathLike, action: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MissingObjectError(f"cannot {action} {path}: no such file")
    return path


def _copy_atomically(src: Path, dest: Path) -> None:
    with atomic_write(dest) as handle, src.open("rb") as source:
        shutil.copyfileobj(source, handle, 16 * MIB)


def upload_file(
    src: str | os.PathLike, dest: str | os.PathLike, *, config: TransferConfig | None = None
) -> None:
    """Copy local file ``src`` to ``dest`` (local path or ``s3://`` URI), atomically.

    On S3 it is a managed transfer: multipart above ``config.multipart_threshold``
    (:func:`default_transfer_config`), the object visible only once every part is in.
    """
    src = _local_file(src, "upload")
    if not is_s3(dest):
        _copy_atomically(src, Path(dest))
        return
    bucket, key = split_s3(str(dest))
    if not key or key.endswith("/"):
        raise StorageError(f"cannot upload {src} to {dest}: the URI names a prefix, not an object")
    with _s3_errors("upload to", str(dest)):
        s3_client().upload_file(str(src), bucket, key, Config=config or default_transfer_config())


def download_file(
    src: str | os.PathLike, dest: str | os.PathLike, *, config: TransferConfig | None = None
) -> Path:
    """Copy ``src`` (local path or ``s3://`` URI) to local ``dest`` atomically; return ``dest``."""
    dest = Path(dest)
    if not is_s3(src):
        _copy_atomically(_local_file(src, "download"), dest)
        return dest
    bucket, key = split_s3(str(src))
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    try:
        with _s3_errors("download", str(src)):
            s3_client().download_file(bucket, key, tmp, Config=config or default_transfer_config())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


# --- directories ------------------------------------------------------------------------------------


def publish_directory(final: str | os.PathLike, build: Callable[[Path], None]) -> Path | str:
    """Run ``build`` on an empty temporary directory and publish it at ``final`` atomically.

    Local ``final``: the directory is built as a temporary sibling and renamed into place (replacing
    ``final``); returns the ``Path``. ``s3://`` ``final``: it is built locally, then uploaded with
    :func:`upload_directory` (marker last); returns the URI. A failed build publishes nothing and
    leaves no temporary directory behind.
    """
    if is_s3(final):
        with tempfile.TemporaryDirectory(prefix="tcapguard-publish-") as tmp:
            build(Path(tmp))
            upload_directory(tmp, final)
        return str(final)
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _prefix(uri: str) -> tuple[str, str]:
    """``(bucket, "key/prefix/")`` for a directory URI (empty prefix: the whole bucket)."""
    bucket, key = split_s3(uri.rstrip("/"))
    return bucket, f"{key}/" if key else ""


def _safe_relative(relative: str, uri: str) -> str:
    """``relative`` if it stays inside the directory; keys such as ``../x`` are refused."""
    parts = PurePosixPath(relative).parts
    if not relative or relative.startswith("/") or any(p in {"..", "."} for p in parts):
        raise StorageError(f"{uri}: refusing object path {relative!r} that leaves the directory")
    return relative


def upload_directory(
    src: str | os.PathLike, dest: str | os.PathLike, *, config: TransferConfig | None = None
) -> dict:
    """Publish every file under local directory ``src`` at ``dest`` (local path or ``s3://`` prefix).

    On S3: the old completion marker is deleted, the files are uploaded concurrently (multipart above
    the threshold), and the manifest marker is written last; returns the manifest. If an upload fails,
    the objects already uploaded are deleted and nothing is marked complete.
    """
    src = Path(src)
    if not src.is_dir():
        raise MissingObjectError(f"cannot upload {src}: no such directory")
    files = sorted(p for p in src.rglob("*") if p.is_file())
    manifest = {
        "format": MANIFEST_FORMAT,
        "id": uuid.uuid4().hex,
        "published": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": {p.relative_to(src).as_posix(): p.stat().st_size for p in files},
    }
    if not is_s3(dest):
        publish_directory(dest, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))
        return manifest
    uri = str(dest)
    bucket, prefix = _prefix(uri)
    if MARKER in manifest["files"]:
        raise StorageError(f"cannot upload {src}: it holds a file named {MARKER}, which marks completion")
    from boto3.s3.transfer import create_transfer_manager

    client = s3_client()
    config = config or default_transfer_config()
    with _s3_errors("publish", uri):
        client.delete_object(Bucket=bucket, Key=prefix + MARKER)  # readers stop trusting the old content
    keys = [prefix + rel for rel in manifest["files"]]
    try:
        with _s3_errors("upload to", uri), create_transfer_manager(client, config) as manager:
            futures = [manager.upload(str(src / rel), bucket, prefix + rel) for rel in manifest["files"]]
            for future in futures:
                future.result()
        write_bytes(join(uri, MARKER), json.dumps(manifest, indent=1).encode())
    except BaseException:
        _delete_keys(bucket, keys)
        raise
    logger.info("published %d files (%d bytes) at %s", len(files), sum(manifest["files"].values()), uri)
    return manifest


def _delete_keys(bucket: str, keys: list[str]) -> None:
    """Best-effort cleanup after a failed publication (the missing marker already hides the objects)."""
    client = s3_client()
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        try:
            client.delete_objects(
                Bucket=bucket, Delete={"Objects": [{"Key": k} for k in chunk], "Quiet": True}
            )
        except Exception as err:  # cleanup must not mask the original error
            logger.warning("could not delete %d partial objects in %s: %s", len(chunk), bucket, err)


def read_manifest(uri: str) -> dict:
    """The completion manifest of the S3 directory ``uri``; StorageError if it is not published."""
    marker = join(uri, MARKER)
    try:
        raw = read_bytes(marker)
    except MissingObjectError as err:
        if _bucket_exists(split_s3(uri)[0]) is False:
            raise
        raise MissingObjectError(
            f"{uri} is not a published directory: no completion marker {marker} (it is still being "
            "written, its upload failed, or another tool uploaded it: then mark it with "
            "tcapguard.storage.mark_complete)"
        ) from err
    try:
        manifest = json.loads(raw)
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}")
    except (ValueError, KeyError, TypeError) as err:
        raise StorageError(f"{marker} is not a tcapguard completion marker: {err}") from err
    return manifest


def _list_objects(uri: str) -> dict[str, int]:
    """relative path -> size of every object under the S3 prefix ``uri`` (marker excluded)."""
    bucket, prefix = _prefix(uri)
    found: dict[str, int] = {}
    with _s3_errors("list", uri):
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                relative = obj["Key"][len(prefix) :]
                if relative and not relative.endswith("/") and relative != MARKER:
                    found[relative] = obj["Size"]
    return found


def mark_complete(uri: str) -> dict:
    """Write the completion marker for the objects now under ``uri`` (uploaded by another tool).

    Only call it once that upload has finished: from then on readers take the listed objects.
    """
    files = _list_objects(uri)
    if not files:
        raise MissingObjectError(f"cannot mark {uri} complete: no objects under it")
    manifest = {
        "format": MANIFEST_FORMAT,
        "id": uuid.uuid4().hex,
        "published": datetime.now(UTC).isoformat(timespec="seconds"),
        "files": files,
    }
    write_bytes(join(uri, MARKER), json.dumps(manifest, indent=1).encode())
    return manifest


def download_prefix(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    config: TransferConfig | None = None,
    manifest: dict | None = None,
) -> Path:
    """Copy the published directory ``src`` (local path or ``s3://`` prefix) to local ``dest``.

    On S3 the completion marker is required (``manifest``: one already read with
    :func:`read_manifest`); exactly the files it lists are downloaded, concurrently, and their sizes
    checked. ``dest`` is replaced atomically: an interrupted download leaves the old ``dest`` (or
    nothing) and no temporary directory.
    """
    dest = Path(dest)
    if not is_s3(src):
        if not Path(src).is_dir():
            raise MissingObjectError(f"cannot download {src}: no such directory")
        publish_directory(dest, lambda tmp: shutil.copytree(src, tmp, dirs_exist_ok=True))
        return dest
    uri = str(src)
    manifest = manifest if manifest is not None else read_manifest(uri)
    bucket, prefix = _prefix(uri)
    files = {_safe_relative(rel, uri): size for rel, size in manifest["files"].items()}
    from boto3.s3.transfer import create_transfer_manager

    def build(tmp: Path) -> None:
        client = s3_client()
        with (
            _s3_errors("download", uri),
            create_transfer_manager(client, config or default_transfer_config()) as manager,
        ):
            futures = []
            for rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                futures.append((rel, manager.download(bucket, prefix + rel, str(tmp / rel))))
            for rel, future in futures:
                try:
                    future.result()
                except Exception as err:
                    raise _translate("download", join(uri, rel), err) from err
        for rel, size in files.items():
            if (actual := (tmp / rel).stat().st_size) != size:
                raise StorageError(
                    f"{join(uri, rel)} has {actual} bytes but its manifest says {size}: the directory "
                    "changed while it was read (republished in place?); read it again"
                )

    publish_directory(dest, build)
    logger.info("downloaded %d files from %s to %s", len(files), uri, dest)
    return dest
