"""Read and publish bytes at a local path or an ``s3://`` URI.

Publication is atomic: a reader never sees a half-written file. Local files are written to a
temporary sibling and renamed; S3 objects are written with a single PUT (S3 makes an object visible
only once its upload completes).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


class StorageError(RuntimeError):
    """An object could not be read or written; the message names the URI and the cause."""


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


def s3_client():
    """A boto3 S3 client from the standard AWS chain (env, config files, instance roles).

    ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` select an S3-compatible server; set
    ``TCAPGUARD_S3_PATH_STYLE=1`` for servers that need path-style addressing.
    """
    import boto3
    from botocore.config import Config

    path_style = os.environ.get("TCAPGUARD_S3_PATH_STYLE", "").lower() in {"1", "true", "yes"}
    config = Config(s3={"addressing_style": "path"}) if path_style else None
    return boto3.client("s3", config=config)


def read_bytes(uri: str | os.PathLike) -> bytes:
    """The content at ``uri``; :class:`StorageError` naming the URI if it is missing or unreadable."""
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(str(uri))
        try:
            return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as err:
            code = err.response.get("Error", {}).get("Code", "unknown")
            raise StorageError(f"cannot read {uri}: S3 error {code}") from err
        except BotoCoreError as err:
            raise StorageError(f"cannot read {uri}: {err}") from err
    try:
        return Path(uri).read_bytes()
    except OSError as err:
        raise StorageError(f"cannot read {uri}: {err.strerror or err}") from err


@contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary sibling of ``path`` for writing; rename it onto ``path`` only on success."""
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
    """Publish ``data`` at ``uri`` atomically."""
    if is_s3(uri):
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_s3(str(uri))
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except (ClientError, BotoCoreError) as err:
            raise StorageError(f"cannot write {uri}: {err}") from err
        return
    with atomic_write(uri) as handle:
        handle.write(data)


def publish_directory(final: str | os.PathLike, build: Callable[[Path], None]) -> Path:
    """Run ``build`` on a temporary sibling of ``final`` and rename it into place (replacing ``final``).

    A killed or failed build leaves neither a half-written ``final`` nor the temporary directory.
    """
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
