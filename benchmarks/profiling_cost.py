"""What profiling costs: plain forward (SDPA) vs this profiler vs eager ``output_attentions=True``.

    .venv/bin/python benchmarks/profiling_cost.py                 # 64 ... 1,024 image tokens
    .venv/bin/python benchmarks/profiling_cost.py --sizes 96 --batches 8

A tiny LLaVA (4 text layers x 8 heads, 256 wide) with 4 px patches, so an image of side S px gives
(S/4)^2 image tokens plus ~60 text tokens. All three methods see the same left-padded batches; time
is the median over repeats in one process, with the methods interleaved so that load from other
processes hits them alike. Peak memory is measured per method in a fresh subprocess (peak RSS
above the RSS after loading the model and encoding the batches: the forward's own memory). Results go
to ``benchmarks/results/profiling_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from tcapguard import world
from tcapguard.data import Dataset
from tcapguard.models import load_model
from tcapguard.profiling import _encode_batch, capture_attention_rows, profile_batch, vision_token_ids
from tcapguard.tiny import TinyMLLMConfig, build_tiny_mllm

METHODS = ("plain", "profiler", "eager")


def build_model(size: int, root: Path) -> Path:
    config = TinyMLLMConfig(
        family="llava",
        image_size=size,
        patch_size=4,
        text_layers=4,
        text_heads=8,
        text_hidden=256,
        text_intermediate=512,
        vision_layers=1,
        vision_hidden=64,
        vision_intermediate=128,
        max_position_embeddings=4096,
    )
    return build_tiny_mllm(config, root / f"llava-{size}", corpus=world.corpus())


def batches(model, processor, size: int, n_batches: int, batch_size: int):
    dataset = world.make_split(n_batches * batch_size, seed=0, id_prefix="cost")
    for record in dataset.records:
        record.pixels = record.pixels.resize((size, size), Image.NEAREST)
    dataset = Dataset(dataset.records)
    pad = processor.tokenizer.pad_token_id
    out = []
    for i in range(n_batches):
        chunk = dataset.records[i * batch_size : (i + 1) * batch_size]
        out.append(_encode_batch(processor, dataset, chunk, vision_token_ids(model), pad))
    return out


@torch.no_grad()
def run_method(method: str, model, batch, components) -> None:
    if method == "plain":
        model(**batch, use_cache=False, logits_to_keep=1)
    elif method == "profiler":
        profile_batch(model, batch, components)
    else:
        model(**batch, use_cache=False, logits_to_keep=1, output_attentions=True)


def switch(model, method: str):
    """Attention setup per method: SDPA for plain and profiler (the latter wraps it), eager for eager."""
    model.set_attn_implementation("eager" if method == "eager" else "sdpa")


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_memory(model_dir: str, size: int, method: str, n_batches: int, batch_size: int) -> dict:
    """Runs in a fresh process: peak RSS of the first pass over the batches above the RSS before it.

    The peak is reset first (``/proc/self/clear_refs``), so loading and encoding do not count; only
    the first pass is measured, since later passes reuse heap that the allocator kept.
    """
    torch.set_num_threads(2)
    model, processor = load_model(model_dir)
    data = batches(model, processor, size, n_batches, batch_size)
    switch(model, method)
    with capture_attention_rows(model) if method == "profiler" else _null():
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_mb("VmRSS")
        for batch, components in data:
            run_method(method, model, batch, components)
    return {"base_mb": base, "peak_mb": _status_mb("VmHWM")}


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def measure_time(model_dir: Path, size: int, repeats: int, n_batches: int, batch_size: int) -> dict:
    model, processor = load_model(model_dir)
    data = batches(model, processor, size, n_batches, batch_size)
    tokens = int(data[0][0]["input_ids"].shape[1])
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for _ in range(repeats):
        for method in METHODS:
            switch(model, method)
            with capture_attention_rows(model) if method == "profiler" else _null():
                start = time.perf_counter()
                for batch, components in data:
                    run_method(method, model, batch, components)
                times[method].append(time.perf_counter() - start)
    switch(model, "sdpa")
    return {"tokens": tokens, **{f"{m}_s": statistics.median(times[m]) for m in METHODS}}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 96, 128])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/profiling_cost.json")
    parser.add_argument(
        "--memory-probe", nargs=3, metavar=("MODEL", "SIZE", "METHOD"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.memory_probe:
        model_dir, size, method = args.memory_probe
        print(json.dumps(measure_memory(model_dir, int(size), method, args.batches, args.batch_size)))
        return
    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            model_dir = build_model(size, Path(tmp))
            row = {
                "image_px": size,
                **measure_time(model_dir, size, args.repeats, args.batches, args.batch_size),
            }
            for method in METHODS:
                probe = [
                    sys.executable,
                    __file__,
                    "--memory-probe",
                    str(model_dir),
                    str(size),
                    method,
                    "--batches",
                    str(args.batches),
                    "--batch-size",
                    str(args.batch_size),
                ]
                mem = json.loads(subprocess.run(probe, check=True, capture_output=True, text=True).stdout)
                row[f"{method}_mem_mb"] = mem["peak_mb"] - mem["base_mb"]
                row[f"{method}_rss_mb"] = mem["peak_mb"]
            rows.append(row)
            print_row(row)
    result = {
        "machine": f"{torch.get_num_threads()} torch threads, CPU",
        "batches": args.batches,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


def print_row(row: dict) -> None:
    print(
        f"tokens {row['tokens']:5d} | time s plain {row['plain_s']:.3f} profiler {row['profiler_s']:.3f} "
        f"({row['profiler_s'] / row['plain_s']:.2f}x) eager {row['eager_s']:.3f} "
        f"({row['eager_s'] / row['plain_s']:.2f}x) | forward memory MB plain {row['plain_mem_mb']:.0f} "
        f"profiler {row['profiler_mem_mb']:.0f} eager {row['eager_mem_mb']:.0f} | peak RSS MB "
        f"{row['plain_rss_mb']:.0f} / {row['profiler_rss_mb']:.0f} / {row['eager_rss_mb']:.0f}",
        flush=True,
    )


if __name__ == "__main__":
    main()
