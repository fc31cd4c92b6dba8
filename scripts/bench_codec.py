"""Codec benchmark: the all-reduce's fp16 and int8 codecs (peer/compression.py) against hivemind's Float16Compression
and BlockwiseQuantization (bitsandbytes), compressing and decoding one all-reduce part in the same process.

    python scripts/bench_codec.py                    # one 2^19-value part, best of 30, one torch thread
    python scripts/bench_codec.py --values 10M --repeats 5

Times are the best of --repeats (the least disturbed by other load on the machine); each row also prints the bytes
of the serialized message, and the worst error of the decoded values relative to the tensor's largest value.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_allreduce
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the peer package from this checkout
from bench_allreduce import parse_size  # noqa: E402


def best_ms(work: Callable[[], object], repeats: int) -> float:
    work()  # warm-up (and the first import of a lazily imported library)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def measure(codec, values: torch.Tensor, repeats: int) -> dict:
    from hivemind.compression import CompressionInfo

    info = CompressionInfo.from_tensor(values)
    message = codec.compress(values, info)
    decoded = codec.extract(message)
    return {
        "compress_ms": best_ms(lambda: codec.compress(values, info), repeats),
        "extract_ms": best_ms(lambda: codec.extract(message), repeats),
        "bytes": message.ByteSize(),
        "max_rel_error": float((decoded.float() - values).abs().max() / values.abs().max()),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--values", type=parse_size, default=2**19, help="values per tensor (default: one part)")
    p.add_argument("--repeats", type=int, default=30, help="timed repetitions; the best is reported")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the benchmarks give each peer one)")
    args = p.parse_args()
    if args.repeats < 1 or args.threads < 1:
        p.error("--repeats and --threads must be at least 1")

    from hivemind.compression import BlockwiseQuantization
    from hivemind.compression import Float16Compression as HivemindFloat16

    from peer.compression import COMPRESSION

    torch.set_num_threads(args.threads)
    values = torch.randn(args.values, generator=torch.Generator().manual_seed(0)) * 1e-3
    # ours first: importing bitsandbytes (hivemind's int8) loads libraries that may slow what runs after it
    ours = {name: measure(COMPRESSION[name], values, args.repeats) for name in ("fp16", "int8")}
    theirs = {
        "fp16": measure(HivemindFloat16(), values, args.repeats),
        "int8": measure(BlockwiseQuantization(), values, args.repeats),
    }
    print(
        f"{args.values} float32 values, {args.threads} torch thread(s), best of {args.repeats}; "
        f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(
        f"{'codec':>5} | {'compress ms':>11} {'hivemind':>8} {'speedup':>7} | {'extract ms':>10} {'hivemind':>8} "
        f"{'speedup':>7} | {'bytes/value':>11} {'hivemind':>8} | {'max err':>8} {'hivemind':>8}"
    )
    for name in ("fp16", "int8"):
        a, b = ours[name], theirs[name]
        print(
            f"{name:>5} | {a['compress_ms']:11.3f} {b['compress_ms']:8.3f} {b['compress_ms'] / a['compress_ms']:7.2f} | "
            f"{a['extract_ms']:10.3f} {b['extract_ms']:8.3f} {b['extract_ms'] / a['extract_ms']:7.2f} | "
            f"{a['bytes'] / args.values:11.4f} {b['bytes'] / args.values:8.4f} | "
            f"{a['max_rel_error']:8.1e} {b['max_rel_error']:8.1e}"
        )
    print(
        "hivemind: Float16Compression and BlockwiseQuantization (bitsandbytes) of hivemind 1.1.12; max err: the"
    )
    print("largest |decoded - value| over the largest |value|")


if __name__ == "__main__":
    main()
