"""The engine thread keeps its intra-op thread count while helper threads run torch on one thread.

ATen gives a thread the process-wide count (torch.set_num_threads) on its first parallel call in
each library, and the fused CPU kernels are a library of their own. A helper that lowered the
process-wide count for itself (the gRPC preparation thread did, on the first request) then set the
engine thread to one thread on the engine's first fused-kernel call: every served request ran on
one core, whatever --threads said, while the gauge said otherwise.
"""

from __future__ import annotations

import argparse
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from bench import make_adapters_bench as make_adapters
from bench.engine_bench import run_engine
from server.config import AdapterConfig, EngineConfig, ServerConfig
from server.engine.engine import Engine
from server.engine.threads import one_intra_op_thread
from server.runtime import build_engine
from tests.cpu_kernels import require_compiler


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _engine(model_dir: Path, root: Path | None) -> Engine:
    adapters = (
        AdapterConfig(roots=(str(root),), max_slots=2, max_rank=8) if root else AdapterConfig(max_slots=0)
    )
    engine = build_engine(
        ServerConfig(
            model=str(model_dir),
            device="cpu",
            threads=2,
            model_kernels="fused",
            engine=EngineConfig(max_running=4, max_queue=16, max_model_len=256, max_batched_tokens=64),
            adapters=adapters,
        )
    )
    assert engine.model.ops.name == "fused-cpu"
    engine.start()
    return engine


def _generate(engine: Engine, adapter: str = "") -> None:
    run_engine(engine, [[5, 6, 7, 8, 9]], 4, [adapter])  # raises when the request failed


def test_a_helper_lowering_its_count_leaves_the_engine_threads(
    make_tiny_model: Any, restore_threads: None
) -> None:
    require_compiler()
    engine = _engine(make_tiny_model(), None)
    try:
        assert engine.snapshot().threads == 2
        with ThreadPoolExecutor(1, initializer=one_intra_op_thread) as helper:
            helper.submit(torch.get_num_threads).result()  # started: its initializer ran
            # another thread raises the process-wide count (as the governor does on the engine
            # thread); the helper still runs torch and the fused kernels on itself alone ...
            raiser = threading.Thread(target=torch.set_num_threads, args=(2,))
            raiser.start()
            raiser.join()
            counts = helper.submit(
                lambda: (torch.get_num_threads(), torch.ops.loramux_cpu.intra_op_threads())
            )
            assert counts.result() == (1, 1)
            # ... and the engine's first fused kernels after it still run on two (read on the engine thread)
            _generate(engine)
        assert engine.snapshot().threads == 2
    finally:
        engine.shutdown()


def test_adapters_are_loaded_on_threads_of_one_intra_op_thread(
    make_tiny_model: Any, tmp_path: Path, restore_threads: None
) -> None:
    require_compiler()
    model_dir = make_tiny_model()
    parser = argparse.ArgumentParser()
    make_adapters.add_arguments(parser)
    flags = [
        "--count",
        "1",
        "--rank",
        "4",
        "--targets",
        "all-linear",
        "--model",
        str(model_dir),
        "--out",
        str(tmp_path),
    ]
    assert make_adapters.main(parser.parse_args(flags)) == 0
    engine = _engine(model_dir, tmp_path)
    try:
        _generate(engine, "adapter-0000")
        assert engine.adapters is not None
        loader = engine.adapters._loader  # noqa: SLF001 - the threads that read and prepared it
        assert loader.submit(torch.get_num_threads).result() == 1
        assert engine.snapshot().threads == 2
    finally:
        engine.shutdown()
