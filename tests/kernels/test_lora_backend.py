"""select_backend: one interface, chosen once per device."""

from __future__ import annotations

import pytest
import torch

from kernels import TorchBackend, TritonBackend, select_backend


def test_cpu_gets_the_torch_backend_and_its_layout() -> None:
    backend = select_backend("cpu")
    assert isinstance(backend, TorchBackend) and backend.name == "torch" and backend.stack_layout == "torch"
    assert select_backend(torch.device("cpu"), strategy="gather").strategy == "gather"  # type: ignore[attr-defined]


def test_triton_on_cpu_needs_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        select_backend("cpu", "triton")


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown kernels backend 'cutlass'"):
        select_backend("cpu", "cutlass")
    with pytest.raises(ValueError, match="unknown torch backend strategy 'fast'"):
        select_backend("cpu", strategy="fast")  # type: ignore[arg-type]


def test_importing_kernels_does_not_import_triton() -> None:
    import subprocess
    import sys

    code = "import sys, kernels; kernels.select_backend('cpu'); print('triton' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_gets_the_triton_backend() -> None:
    backend = select_backend("cuda")
    assert isinstance(backend, TritonBackend) and backend.stack_layout == "triton"
