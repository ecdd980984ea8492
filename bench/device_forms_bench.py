"""The loader thread's work to put a compressed demo adapter in its compact GPU form, timed on CPU.

On a GPU, MoS and ComPEFT adapters go to the compact slot pools (adapters_store/compact_pools.py),
whose `prepare` builds the form the kernels read: MoS pools and index tables, ComPEFT's 2-bit sign
codes. That work is host work (decode, pack, check) plus one host -> device copy per tensor; this
benchmark builds the same pools on the CPU (no copy) so that it runs on any machine and can be
compared side by side with an older checkout. The issue's bar: at most 5 ms an adapter.

    loramux bench device-forms [--repeats 50] [--adapters sql-mos,sql-compeft-05,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the triton backend's pools, without a GPU

import torch  # noqa: E402

from adapters_store import BaseModelSpec, load_adapter  # noqa: E402
from adapters_store.compact_pools import CompeftSlotPool, MosSlotPool  # noqa: E402
from kernels import select_backend  # noqa: E402
from server.allocator import keep_freed_memory  # noqa: E402

ADAPTERS = Path(__file__).resolve().parent.parent / "adapters"
DEFAULT = "sql-mos,sql-compeft-05,sql-compeft-10,sql-compeft-20,arith-mos,arith-compeft-10"
GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
# SmolLM2-135M's projections, as the demo adapters were trained on
SPEC = BaseModelSpec.llama(
    num_layers=30, hidden_size=576, intermediate_size=1536, q_size=576, kv_size=192, max_rank=16
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapters", default=DEFAULT, help="demo adapters under adapters/, comma-separated")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc malloc as it is (the server tunes it)"
    )


def main(args: argparse.Namespace) -> int:
    if not args.default_malloc:
        keep_freed_memory()  # as the server does (server/allocator.py)
    torch.set_num_threads(args.threads)
    backend = select_backend("cpu", "triton")
    pools = {
        "mos": MosSlotPool(SPEC, GROUPS, 1, backend, "cpu", torch.float32),
        "compeft": CompeftSlotPool(SPEC, GROUPS, 1, backend, "cpu"),
    }
    print(f"{'adapter':18} {'median ms':>10} {'min ms':>8}")
    for name in [a for a in args.adapters.split(",") if a]:
        adapter = load_adapter(ADAPTERS / name, SPEC, name)
        pool = pools[adapter.format]
        pool.prepare(adapter)  # warm
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            pool.prepare(adapter)
            times.append(time.perf_counter() - start)
        print(f"{name:18} {statistics.median(times) * 1e3:10.2f} {min(times) * 1e3:8.2f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(main(parser.parse_args()))
