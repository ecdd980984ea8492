"""Build and load the fused CPU kernels (csrc/: model_ops.cpp and its headers) as torch.ops.loramux_cpu.*.

Compiled once per machine with the system C++ compiler into the loramux cache
(`$LORAMUX_CACHE/extensions`, default ~/.cache/loramux/extensions), keyed by the source, torch's
version and the CPU capability torch dispatches to (AVX512, AVX2 or DEFAULT), then loaded into
the process. A build takes a few seconds (only torch's light headers are included, no pybind11);
a cached build loads without a compiler. Libraries in the package's `prebuilt/` folder are used
first: the Docker image builds all three capabilities there, where no cache mount hides them. Nothing here decides whether the kernels
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


_COMPILE_TIMEOUT_S = 600


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


def _flags(capability: str) -> list[str]:
    """Everything in the compile command that decides the library, bar paths (part of the cache key)."""
    return [
        "-shared",
        "-fPIC",
        "-O3",
        "-std=c++20",
        "-fopenmp",  # at::parallel_for is OpenMP in torch's headers; libgomp.so.1 resolves to torch's copy
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-DCPU_CAPABILITY={capability}",
        *_CAPABILITY_FLAGS.get(capability, []),
        "-lc10",
        "-ltorch_cpu",
    ]


def _command(compiler: str, capability: str, output: Path) -> list[str]:
    from torch.utils import cpp_extension

    torch_lib = str(Path(torch.__file__).parent / "lib")
    return [
        compiler,
        str(SOURCE),
        "-o",
        str(output),
        *(f"-I{path}" for path in cpp_extension.include_paths()),
        f"-L{torch_lib}",
        f"-Wl,-rpath,{torch_lib}",
        *_flags(capability),
    ]


def _library_name(capability: str) -> str:
    key = hashlib.sha256()
    sources = sorted(SOURCE.parent.glob("*.cpp")) + sorted(SOURCE.parent.glob("*.h"))
    for part in (*(path.read_bytes() for path in sources), torch.__version__.encode()):
        key.update(part)
    key.update(" ".join(_flags(capability)).encode())
    return f"model_ops-{capability.lower()}-{key.hexdigest()[:16]}.so"


def prebuilt_dir() -> Path:
    """Libraries shipped with the installed package (the Docker image builds them here), searched first."""
    return Path(__file__).parent / "prebuilt"


def build(build_dir: Path | None = None, capability: str | None = None) -> Path:
    """Compile the extension unless an up-to-date build is cached; returns the shared library.

    capability: AVX512 | AVX2 | DEFAULT (default: the one torch uses on this machine).
    """
    build_dir = build_dir or default_build_dir()
    capability = capability or _capability()
    if capability not in (*_CAPABILITY_FLAGS, "DEFAULT"):
        raise CpuExtensionError(f"unknown CPU capability {capability!r}: use AVX512, AVX2 or DEFAULT")
    try:
        name = _library_name(capability)
    except OSError as exc:
        raise CpuExtensionError(f"reading {SOURCE} failed: {exc}") from exc
    for library in (prebuilt_dir() / name, build_dir / name):
        if library.exists():
            return library
    compiler = _compiler()
    log.info("building the fused CPU kernels for %s (once per machine, a few seconds)", capability)
    started = time.perf_counter()
    try:
        _compile(compiler, capability, library)
    except OSError as exc:  # an unwritable cache, a compiler that cannot run, ...
        raise CpuExtensionError(f"building {library} failed: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise CpuExtensionError(f"compiling {SOURCE.name} took over {_COMPILE_TIMEOUT_S} s") from exc
    log.info("built %s in %.1f s", library, time.perf_counter() - started)
    return library


def _compile(compiler: str, capability: str, library: Path) -> None:
    build_dir = library.parent
    build_dir.mkdir(parents=True, exist_ok=True)
    for leftover in build_dir.glob("partial-*.so"):  # from a build killed midway, an hour or more ago
        if time.time() - leftover.stat().st_mtime > 3600:
            leftover.unlink(missing_ok=True)
    # Build beside the target and rename: concurrent builders never see a half-written library.
    # (Builds of other versions stay: checkouts of different versions may share this cache.)
    fd, partial = tempfile.mkstemp(prefix="partial-", suffix=".so", dir=build_dir)
    os.close(fd)
    try:
        command = _command(compiler, capability, Path(partial))
        done = subprocess.run(command, capture_output=True, text=True, timeout=_COMPILE_TIMEOUT_S)
        if done.returncode != 0:
            raise CpuExtensionError(f"compiling {SOURCE.name} failed:\n{done.stderr[-4000:]}")
        os.replace(partial, library)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def is_loaded() -> bool:
    """Whether torch.ops.loramux_cpu is registered in this process (and passed the checks of load)."""
    return hasattr(getattr(torch.ops, NAMESPACE), "rms_norm") and not _REFUSED


_LOAD_LOCK = threading.Lock()  # a library registers its op namespace once per process
_REFUSED: list[str] = []  # why a loaded library must not be used (it cannot be unloaded)


def take_intra_op_threads() -> int:
    """Fix the calling thread's intra-op thread count now, in torch and in these kernels alike; returns it.

    ATen gives each thread the process-wide count (`torch.set_num_threads`) on its first parallel
    call, once per library that inlines at::parallel_for: these kernels keep their own "taken" flag.
    A thread that took its count in torch alone gets the process-wide count of a later moment on its
    first kernel call: the engine thread ran on one thread for good after a helper thread lowered
    the process-wide count for itself (server/engine/threads.py). Call this first on any thread that
    runs torch and must keep its count."""
    count = torch.get_num_threads()
    if is_loaded():
        torch.ops.loramux_cpu.intra_op_threads()
    return count


def load(build_dir: Path | None = None) -> None:
    """Build if needed and register torch.ops.loramux_cpu in this process (raises CpuExtensionError)."""
    with _LOAD_LOCK:
        if _REFUSED:
            raise CpuExtensionError(_REFUSED[0])
        if is_loaded():
            return
        library = build(build_dir)
        before = _openmp_runtimes()
        try:
            torch.ops.load_library(str(library))
        except (OSError, RuntimeError) as exc:
            raise CpuExtensionError(f"loading {library} failed: {exc}") from exc
        brought = sorted(set(_openmp_runtimes()) - set(before))
        if brought:  # its threads would not be torch's: no set_num_threads, oversubscribed cores
            _REFUSED.append(
                f"{library.name} brought its own OpenMP runtime ({', '.join(brought)}), not torch's"
            )
            raise CpuExtensionError(_REFUSED[0])


def _openmp_runtimes() -> list[str]:
    """The OpenMP runtime libraries mapped into this process (Linux; [] where /proc cannot tell)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    names = ("libgomp", "libiomp", "libomp")
    paths = {
        line.split()[-1] for line in maps.splitlines() if any(n in line.rsplit("/", 1)[-1] for n in names)
    }
    return sorted({os.path.realpath(p) for p in paths})
