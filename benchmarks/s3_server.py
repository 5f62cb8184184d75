"""Start/stop the test Ceph RGW several times; time it and a multipart round trip through tcapguard.storage.

    .venv/bin/python benchmarks/s3_server.py               # 5 cycles, 64 MiB file
    .venv/bin/python benchmarks/s3_server.py --cycles 10 --mib 256

Needs the Debian packages (``make ceph``). Results go to ``benchmarks/results/s3_server.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from s3server import CephRGW
from tcapguard import storage


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cycles", type=int, default=5)
    parser.add_argument("--mib", type=int, default=64, help="size of the file sent up and back each cycle")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "s3_server.json"))
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        payload = Path(tmp) / "payload.bin"
        payload.write_bytes(os.urandom(args.mib * storage.MIB))
        config = storage.default_transfer_config(
            multipart_threshold=8 * storage.MIB, multipart_chunksize=8 * storage.MIB
        )
        for cycle in range(args.cycles):
            rgw = CephRGW(Path(tempfile.mkdtemp(prefix="tcapguard-rgw-")))
            server = rgw.start()
            try:
                os.environ.update(server.env())
                server.client().create_bucket(Bucket="bench")
                t0 = time.perf_counter()
                storage.upload_file(payload, "s3://bench/payload.bin", config=config)
                t1 = time.perf_counter()
                back = storage.download_file("s3://bench/payload.bin", Path(tmp) / "back.bin", config=config)
                t2 = time.perf_counter()
                assert back.read_bytes() == payload.read_bytes()
            finally:
                s0 = time.perf_counter()
                rgw.stop()
                stop = time.perf_counter() - s0
            row = {"cycle": cycle, "start_s": rgw.start_seconds, "stop_s": stop, "upload_s": t1 - t0,
                   "download_s": t2 - t1, "mib": args.mib}  # fmt: skip
            rows.append(row)
            print(f"cycle {cycle}: start {row['start_s']:.2f} s, {args.mib} MiB up {row['upload_s']:.2f} s, "
                  f"down {row['download_s']:.2f} s, stop {stop:.2f} s")  # fmt: skip

    summary = {
        k: statistics.median(r[k] for r in rows) for k in ("start_s", "stop_s", "upload_s", "download_s")
    }
    print("\n| median | start | stop | upload | download |\n|---|---|---|---|---|")
    print(f"| {len(rows)} cycles | {summary['start_s']:.2f} s | {summary['stop_s']:.2f} s | "
          f"{summary['upload_s']:.2f} s | {summary['download_s']:.2f} s |")  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"cycles": rows, "median": summary, "cpus": os.cpu_count()}, indent=1)
    )


if __name__ == "__main__":
    main()
