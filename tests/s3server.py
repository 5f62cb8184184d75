"""A real S3-compatible server for the tests: single-node Ceph (mon + memstore OSD) with a RADOS Gateway.

Ceph RGW is a production S3 implementation from Debian (``radosgw``, ``ceph-mon``, ``ceph-osd``; ``make
ceph`` installs them). It checks SigV4 signatures and runs multipart uploads, unlike moto. Everything
listens on 127.0.0.1 ports picked at start, lives in one temporary directory, keeps its data in memory
and is killed at teardown; auth inside the cluster is off (the S3 user's keys are still checked).

Start-up takes about 2-3 s instead of the 20 s of the stock recipe (shared/notes/ecosystem.md §5):
the monitor commits every change at once (``paxos propose interval``) instead of once a second,
the RGW pools are created up front in one client process, and RGW's object client re-checks the OSD
map every 0.5 s instead of 5 s.

Fixtures (imported by conftest.py): ``s3_server`` (session; the server and its user's keys),
``s3_env`` (the AWS environment pointing at it, isolated from ~/.aws), ``s3_bucket`` (a fresh bucket).
Run ``python tests/s3server.py`` to start one by hand and print its environment.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

PACKAGES = ("radosgw", "ceph-mon", "ceph-osd")
PROGRAMS = ("ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph", "ceph-authtool", "monmaptool")
RGW_POOLS = (
    ".rgw.root",
    "default.rgw.control",
    "default.rgw.meta",
    "default.rgw.log",
    "default.rgw.buckets.index",
    "default.rgw.buckets.data",
    "default.rgw.buckets.non-ec",
)

# Runs under the Python that ships Ceph's own bindings (the interpreter of the `ceph` CLI): one
# process for every monitor command, since each `ceph ...` invocation costs a Python start-up.
_MON_SCRIPT = """
import json, sys, uuid, rados
conf, osd_uuid, pools = sys.argv[1], sys.argv[2], sys.argv[3:]
cluster = rados.Rados(conffile=conf)
cluster.connect(timeout=30)
def mon(**cmd):
    ret, out, err = cluster.mon_command(json.dumps(cmd), b"")
    if ret != 0:
        sys.exit(f"mon command {cmd} failed ({ret}): {err}")
    return out
osd_id = json.loads(mon(prefix="osd create", uuid=osd_uuid, format="json"))["osdid"]
mon(prefix="osd crush add", id=osd_id, weight=1.0, args=["host=localhost", "root=default"])
for pool in pools:
    mon(prefix="osd pool create", pool=pool, pg_num=8)
    mon(prefix="osd pool application enable", pool=pool, app="rgw")
print(osd_id)
"""


@dataclass(frozen=True)
class S3Server:
    """Where the server listens and the keys of its one user."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The standard AWS variables (plus path-style addressing) that point boto3 and MLflow here."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "TCAPGUARD_S3_PATH_STYLE": "1",
        }

    def client(self):
        """A boto3 client with explicit settings, independent of the process environment."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=self.region,
            config=Config(s3={"addressing_style": "path"}),
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:
    """Make a daemon die when the test process does (even on SIGKILL), so none is ever orphaned."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class CephRGW:
    """Start and stop a throwaway Ceph cluster with an RGW in ``workdir``."""

    def __init__(self, workdir: Path, access_key: str = "TCAPTESTKEY", secret_key: str | None = None):
        self.workdir = Path(workdir)
        self.access_key = access_key
        self.secret_key = secret_key or uuid.uuid4().hex
        self.procs: dict[str, subprocess.Popen] = {}
        self.start_seconds: float | None = None

    @staticmethod
    def missing_programs() -> list[str]:
        return [p for p in PROGRAMS if shutil.which(p) is None]

    def _write_conf(self, mon_port: int, rgw_port: int) -> None:
        d = self.workdir
        for sub in ("run", "log", "mon.a", "osd.0", "rgw"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        (d / "ceph.conf").write_text(
            f"""[global]
fsid = {self.fsid}
mon host = v1:127.0.0.1:{mon_port}
public network = 127.0.0.0/8
auth cluster required = none
auth service required = none
auth client required = none
run dir = {d}/run
admin socket = {d}/run/$name.asok
log file = {d}/log/$name.log
pid file = {d}/run/$name.pid
keyring = {d}/keyring
osd pool default size = 1
osd pool default min size = 1
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 1
osd pool default pg autoscale mode = off
osd pool default pg num = 8
osd pool default pgp num = 8
mon max pg per osd = 1000
osd crush chooseleaf type = 0
ms bind ipv4 = true
ms bind ipv6 = false
objecter tick interval = 0.5
[mon]
mon data = {d}/mon.$id
mon allow pool delete = true
paxos propose interval = 0.01
paxos min wait = 0.01
[osd]
osd data = {d}/osd.$id
osd objectstore = memstore
memstore device bytes = 2147483648
osd journal size = 0
osd crush update on start = false
osd class update on start = false
[client.rgw.a]
rgw data = {d}/rgw
rgw frontends = beast endpoint=127.0.0.1:{rgw_port}
rgw dns name = localhost
"""
        )

    def _run(self, *args: str, timeout: float = 60) -> str:
        result = subprocess.run(
            args, env=self.env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:3])} failed ({result.returncode}): {result.stderr[-2000:]}")
        return result.stdout

    def _daemon(self, name: str, *args: str) -> None:
        log = (self.workdir / "log" / f"{name}.out").open("wb")
        self.procs[name] = subprocess.Popen(
            args, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )  # fmt: skip
        log.close()

    def _log_tail(self) -> str:
        lines = []
        for log in sorted((self.workdir / "log").glob("*")):
            tail = log.read_text(errors="replace").splitlines()[-8:]
            lines += [f"--- {log.name}", *tail]
        return "\n".join(lines)

    def start(self, timeout: float = 90) -> S3Server:
        """Bring up mon, OSD and RGW, create the S3 user; :class:`RuntimeError` with log tails on failure."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        self.fsid = uuid.uuid4()
        mon_port, rgw_port = _free_port(), _free_port()
        self._write_conf(mon_port, rgw_port)
        self.env = {**os.environ, "CEPH_CONF": str(self.workdir / "ceph.conf")}
        self.env.pop("PYTHONPATH", None)
        ceph_python = Path(shutil.which("ceph")).read_text().splitlines()[0].removeprefix("#!").split()
        d = self.workdir
        try:
            self._run("ceph-authtool", "--create-keyring", f"{d}/keyring", "--gen-key", "-n", "mon.",
                      "--cap", "mon", "allow *")  # fmt: skip
            self._run("monmaptool", "--create", "--addv", "a", f"[v1:127.0.0.1:{mon_port}]",
                      "--fsid", str(self.fsid), f"{d}/monmap")  # fmt: skip
            self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", f"{d}/monmap", "--keyring", f"{d}/keyring")
            self._daemon("mon", "ceph-mon", "-f", "-i", "a")
            osd_uuid = str(uuid.uuid4())
            osd_id = self._run(*ceph_python, "-c", _MON_SCRIPT, str(d / "ceph.conf"), osd_uuid, *RGW_POOLS)
            osd_id = osd_id.strip()
            self._run("ceph-osd", "-i", osd_id, "--mkfs", "--osd-uuid", osd_uuid)
            self._daemon("osd", "ceph-osd", "-f", "-i", osd_id)
            self._daemon("rgw", "radosgw", "-f", "-n", "client.rgw.a")
            endpoint = f"http://127.0.0.1:{rgw_port}"
            self._wait_http(endpoint, deadline)
            self._run("radosgw-admin", "user", "create", "--uid=tcapguard-test", "--display-name=test",
                      f"--access-key={self.access_key}", f"--secret-key={self.secret_key}")  # fmt: skip
            server = S3Server(endpoint, self.access_key, self.secret_key)
            self._wait_s3(server, deadline)
        except BaseException as err:
            tail = self._log_tail()
            self.stop()
            if isinstance(err, Exception):
                raise RuntimeError(f"Ceph RGW did not start in {self.workdir}: {err}\n{tail}") from err
            raise
        self.start_seconds = time.monotonic() - t0
        return server

    def _wait_http(self, endpoint: str, deadline: float) -> None:
        while True:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}")
            try:
                urllib.request.urlopen(endpoint, timeout=2).close()
                return
            except urllib.error.HTTPError:
                return  # any HTTP answer means the frontend is up
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"no HTTP answer from {endpoint}") from None
                time.sleep(0.05)

    def _wait_s3(self, server: S3Server, deadline: float) -> None:
        """One signed request that needs the OSD (creating a bucket), so tests never wait on peering."""
        client = server.client()
        name = f"ready-{uuid.uuid4().hex[:8]}"
        while True:
            try:
                client.create_bucket(Bucket=name)
                client.delete_bucket(Bucket=name)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        """Kill the daemons (the data is throwaway; a graceful RGW exit takes seconds) and remove the dir."""
        for proc in reversed(self.procs.values()):
            if proc.poll() is None:
                proc.kill()
        for proc in self.procs.values():
            proc.wait()
        self.procs.clear()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _unavailable(message: str) -> None:
    """Fail in CI (a missing server there is a broken set-up), skip elsewhere; both say what to do."""
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A running Ceph RGW for the whole session (started on first use)."""
    missing = CephRGW.missing_programs()
    if missing:
        _unavailable(
            f"S3 tests need a Ceph RADOS Gateway, but PATH lacks {', '.join(missing)}: run `make ceph` "
            f"(as root: apt-get install {' '.join(PACKAGES)})"
        )
    for attempt in (1, 2):  # a second try with fresh ports and fsid, should a port be taken meanwhile
        # A short path: Ceph's admin sockets live under it and Unix socket paths are limited to 107 bytes.
        rgw = CephRGW(Path(tempfile.mkdtemp(prefix="tcapguard-rgw-")))
        try:
            server = rgw.start()
            break
        except RuntimeError as err:
            if attempt == 2:
                _unavailable(str(err))
            print(f"\nCeph RGW start failed, trying again: {err}", file=sys.stderr)
    print(f"\nCeph RGW up at {server.endpoint} in {rgw.start_seconds:.1f} s", file=sys.stderr)
    yield server
    rgw.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """Point the standard AWS chain (boto3, tcapguard.storage, MLflow) at the test server only."""
    for name in list(os.environ):
        if name.startswith(("AWS_", "TCAPGUARD_S3_")):
            monkeypatch.delenv(name)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return s3_server


@pytest.fixture
def s3_bucket(s3_env: S3Server) -> str:
    """``s3://<fresh bucket>`` on the test server, with :func:`s3_env` in effect."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    s3_env.client().create_bucket(Bucket=name)
    return f"s3://{name}"


if __name__ == "__main__":
    rgw = CephRGW(Path(tempfile.mkdtemp(prefix="tcapguard-rgw-")))
    server = rgw.start()
    print(f"# Ceph RGW up in {rgw.start_seconds:.1f} s; Ctrl-C stops it", file=sys.stderr)
    for key, value in server.env().items():
        print(f"export {key}={value}")
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        rgw.stop()
