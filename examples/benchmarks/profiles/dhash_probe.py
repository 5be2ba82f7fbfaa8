"""Where dhash's time goes on this machine's CPU: one image's decode, grey conversion and resize in
one process, then rows/s of the bare hash loop (no Lance, no engine) in 1..N spawned processes, to
see how the cores scale (hyper-threads share a core's units). Not a benchmark with targets: it
explains `vlmspec bench apply`'s dhash figure. Run on the GPU machine after
`source examples/benchmarks/gpu_device_setup.sh`:

    python3 examples/benchmarks/profiles/dhash_probe.py --out $OUT/dhash_probe.json
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import sys
import time
from pathlib import Path

_BLOBS: list[bytes] = []


def _init(blobs: list[bytes]) -> None:
    global _BLOBS
    _BLOBS = blobs
    # what a vlmspec worker has imported before its first chunk: lance (and pandas through it), the UDF
    from vlmspec.runtime.executors import chunks  # noqa: F401
    from vlmspec.runtime.udfs import image  # noqa: F401


def _hash_all(_: int) -> float:
    import pyarrow as pa

    from vlmspec.runtime.udfs.image import dhash

    t = time.perf_counter()
    dhash(pa.array(_BLOBS, pa.large_binary()))
    return time.perf_counter() - t


def per_image(blobs: list[bytes]) -> dict:
    import imagehash
    from PIL import Image

    def ms(fn) -> float:
        t = time.perf_counter()
        for b in blobs:
            fn(b)
        return round((time.perf_counter() - t) / len(blobs) * 1e3, 3)

    grey = [Image.open(io.BytesIO(b)).convert("L") for b in blobs[:64]]
    t = time.perf_counter()
    for g in grey:
        g.resize((9, 8), Image.Resampling.LANCZOS)
    return {"decode_ms": ms(lambda b: Image.open(io.BytesIO(b)).load()),
            "decode_grey_ms": ms(lambda b: Image.open(io.BytesIO(b)).convert("L")),
            "resize_ms": round((time.perf_counter() - t) / len(grey) * 1e3, 3),
            "imagehash_dhash_ms": ms(lambda b: imagehash.dhash(Image.open(io.BytesIO(b)))),
            "bytes_per_image": sum(map(len, blobs)) // len(blobs)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--image-px", type=int, default=560)
    ap.add_argument("--procs", default="1,4,8,16")
    ap.add_argument("--out", default="dhash_probe.json")
    args = ap.parse_args()
    from vlmspec.runtime.sources.synthetic import generate

    blobs = [b for batch in generate(args.images, seed=3, image_px=args.image_px, batch_rows=256)
             for b in batch.column("image").to_pylist()]
    out = {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "per_image": per_image(blobs), "scaling": []}
    for n in [int(x) for x in args.procs.split(",") if int(x) <= (os.cpu_count() or 1)]:
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(n, initializer=_init, initargs=(blobs,)) as pool:
            t = time.perf_counter()
            first = pool.map(_hash_all, range(n))  # every worker's first pass, apart: is it slower?
            first_wall = time.perf_counter() - t
            t = time.perf_counter()
            per = pool.map(_hash_all, range(2 * n))
            wall = time.perf_counter() - t
        out["scaling"].append({"procs": n, "rows_per_s": round(2 * n * len(blobs) / wall),
                               "ms_per_row_in_worker": round(sum(per) / (2 * n * len(blobs)) * 1e3, 3),
                               "first_pass_rows_per_s": round(n * len(blobs) / first_wall),
                               "first_pass_ms_per_row": round(sum(first) / (n * len(blobs)) * 1e3, 3)})
        print(json.dumps(out["scaling"][-1]), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    main()
