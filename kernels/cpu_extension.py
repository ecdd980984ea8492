"""Build and load the fused CPU kernels (csrc/model_ops.cpp) as torch.ops.loramux_cpu.*.

Compiled once per machine with the system C++ compiler into the loramux cache
(`$LORAMUX_CACHE/extensions`, default ~/.cache/loramux/extensions), keyed by the source, torch's
version and the CPU capability torch dispatches to (AVX512, AVX2 or DEFAULT), then loaded into
the process. A build takes a few seconds (only torch's light headers are included, no pybind11);
a cached build loads without a compiler, so an image can ship prebuilt libraries (the
Dockerfile builds all three with `build(capability=...)`). Nothing here decides whether the kernels
are used: kernels/model_ops.py does, and falls back to torch when this fails.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "model_ops.cpp"
NAMESPACE = "loramux_cpu"

# Compiler flags per ATen CPU capability: at::vec then compiles to the same instruction set
# (and the same Sleef exp) as torch's own kernels on this machine.
_CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
}


class CpuExtensionError(RuntimeError):
    """The fused CPU kernels could not be built or loaded (the message says why)."""


def default_build_dir() -> Path:
    root = os.environ.get("LORAMUX_CACHE") or str(Path.home() / ".cache" / "loramux")
    return Path(root) / "extensions"


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise CpuExtensionError("no C++ compiler found (install g++ or set CXX)")
    return compiler


def _capability() -> str:
    capability = torch.backends.cpu.get_cpu_capability()
    return capability if capability in _CAPABILITY_FLAGS else "DEFAULT"


def _command(compiler: str, capability: str, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = str(Path(torch.__file__).parent / "lib")
    return [
        compiler,
        str(SOURCE),
        "-o",
        str(output),
        "-shared",
        "-fPIC",
        "-O3",
        "-std=c++20",
        "-fopenmp",  # at::parallel_for is OpenMP in torch's headers; libgomp.so.1 resolves to torch's copy
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DCPU_CAPABILITY={capability}",
        *_CAPABILITY_FLAGS.get(capability, []),
        *(f"-I{path}" for path in cpp_extension.include_paths()),
        f"-L{torch_lib}",
        f"-Wl,-rpath,{torch_lib}",
        "-lc10",
        "-ltorch_cpu",
    ]


def _library_path(build_dir: Path, capability: str) -> Path:
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), capability.encode()):
        key.update(part)
    return build_dir / f"model_ops-{capability.lower()}-{key.hexdigest()[:16]}.so"


def build(build_dir: Path | None = None, capability: str | None = None) -> Path:
    """Compile the extension unless an up-to-date build is cached; returns the shared library.

    capability: AVX512 | AVX2 | DEFAULT (default: the one torch uses on this machine).
    """
    build_dir = build_dir or default_build_dir()
    capability = capability or _capability()
    if capability not in (*_CAPABILITY_FLAGS, "DEFAULT"):
        raise CpuExtensionError(f"unknown CPU capability {capability!r}: use AVX512, AVX2 or DEFAULT")
    library = _library_path(build_dir, capability)
    if library.exists():
        return library
    compiler = _compiler()
    log.info("building the fused CPU kernels for %s (once per machine, a few seconds)", capability)
    started = time.perf_counter()
    try:
        _compile(compiler, capability, library)
    except OSError as exc:  # an unwritable cache, a compiler that cannot run, ...
        raise CpuExtensionError(f"building {library} failed: {exc}") from exc
    log.info("built %s in %.1f s", library, time.perf_counter() - started)
    return library


def _compile(compiler: str, capability: str, library: Path) -> None:
    build_dir = library.parent
    build_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders never see a half-written library.
    fd, partial = tempfile.mkstemp(suffix=".so", dir=build_dir)
    os.close(fd)
    try:
        done = subprocess.run(_command(compiler, capability, Path(partial)), capture_output=True, text=True)
        if done.returncode != 0:
            raise CpuExtensionError(f"compiling {SOURCE.name} failed:\n{done.stderr[-4000:]}")
        os.replace(partial, library)
        for stale in build_dir.glob(f"model_ops-{capability.lower()}-*.so"):  # older sources' builds
            if stale != library:
                stale.unlink(missing_ok=True)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def is_loaded() -> bool:
    """Whether torch.ops.loramux_cpu is registered in this process."""
    return hasattr(getattr(torch.ops, NAMESPACE), "rms_norm")


_LOAD_LOCK = threading.Lock()  # a library registers its op namespace once per process


def load(build_dir: Path | None = None) -> None:
    """Build if needed and register torch.ops.loramux_cpu in this process (raises CpuExtensionError)."""
    with _LOAD_LOCK:
        if is_loaded():
            return
        library = build(build_dir)
        try:
            torch.ops.load_library(str(library))
        except OSError as exc:
            raise CpuExtensionError(f"loading {library} failed: {exc}") from exc
