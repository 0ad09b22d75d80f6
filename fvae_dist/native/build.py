"""Compile the native helpers on first use and load them with ctypes.

    load_gru_kernels() -> ctypes.CDLL | None     gru_cell.cpp: the fused GRU's step kernels
    torch_sgemm() -> int | None                  the address of the sgemm of torch's own BLAS, for
                                                 gru_cell.cpp's whole-sequence loops and
                                                 factor_head.cpp's whole step
    load_head_kernels() -> ctypes.CDLL | None    factor_head.cpp: FactorVAE's loss (eqs. 5-17) and
                                                 its gradient in one pass (models/fused_head.py)
    load_optim_kernels() -> ctypes.CDLL | None   adamw.cpp: AdamW's step and the gradient norm over all
                                                 tensors in one call each (train/optim_step.py)
    load_shm_sync()    -> ctypes.CDLL | None     shm_sync.cpp: the cross-process counters of the
                                                 shared-memory all-reduce and step flags
                                                 (train/shm_allreduce.py)
Each returns None (with one warning) when unavailable.

The library is built with the machine's C++ compiler (g++ or $CXX) for the machine's own CPU
(-march=native) and cached under $FVAE_DIST_NATIVE_CACHE, else ~/.cache/fvae-dist/native. The
cache key covers the source, the shared headers (*.h here), the compiler, the flags and the
CPU's feature flags, so a cache directory shared between different machines never hands one a
library built for another.
Several processes (Ray workers) may build at once: each writes its own temporary file and
renames it into place, so a reader never sees a half-written library.

No compiler, a failed build or FVAE_DIST_FUSED_GRU=0 all mean the same thing to callers: the
kernels are unavailable and the models use torch.nn.GRU (same function, slower); likewise
FVAE_DIST_FUSED_HEAD=0 (or no kernels) means FactorVAE's loss runs through the reference
modules of models/factorvae.py, and FVAE_DIST_NATIVE_OPTIM=0 that torch's AdamW and
clip_grad_norm_ step the weights; without shm_sync, DDP averages gradients through its process
group (gloo), as torch does by default.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# -fopenmp-simd: honour "#pragma omp simd reduction" (vectorised dot products) without OpenMP's
# threads or runtime library
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fopenmp-simd")
DISABLE_ENV = "FVAE_DIST_FUSED_GRU"
DISABLE_HEAD_ENV = "FVAE_DIST_FUSED_HEAD"
DISABLE_OPTIM_ENV = "FVAE_DIST_NATIVE_OPTIM"
CACHE_ENV = "FVAE_DIST_NATIVE_CACHE"


@dataclass(frozen=True)
class NativeLibrary:
    source: Path
    abi_symbol: str                          # extern "C" int returning abi_version
    abi_version: int
    declare: Callable[[ctypes.CDLL], None]   # sets argtypes / restype
    fallback: str                            # what callers do without it (for the warning)


_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def load_gru_kernels() -> ctypes.CDLL | None:
    """The compiled GRU kernels, or None when they are disabled or cannot be built here."""
    if _disabled(DISABLE_ENV):
        return None
    return _load("gru")


def load_head_kernels() -> ctypes.CDLL | None:
    """The compiled FactorVAE loss kernel, or None when it is disabled or cannot be built here."""
    if _disabled(DISABLE_HEAD_ENV):
        return None
    return _load("head")


def load_optim_kernels() -> ctypes.CDLL | None:
    """The compiled AdamW step and gradient norm, or None when disabled or unavailable here."""
    if _disabled(DISABLE_OPTIM_ENV):
        return None
    return _load("optim")


@functools.cache
def torch_sgemm() -> int | None:
    """The address of sgemm_ (Fortran BLAS, 32-bit integers) in the BLAS torch itself runs its
    float32 products on (MKL, linked into libtorch_cpu on x86), or None where torch's libraries
    do not export one. Calling torch's own BLAS keeps its thread settings (torch.set_num_threads)
    and its arithmetic; another BLAS found on the system would have neither."""
    import torch

    for library in sorted((Path(torch.__file__).parent / "lib").glob("libtorch_cpu*.so*")):
        try:
            symbol = getattr(ctypes.CDLL(str(library)), "sgemm_")
        except (OSError, AttributeError):
            continue
        return ctypes.cast(symbol, ctypes.c_void_p).value
    return None


def _disabled(variable: str) -> bool:
    return os.environ.get(variable, "1").strip().lower() in ("0", "false", "no", "off")


def load_shm_sync() -> ctypes.CDLL | None:
    """The shared-memory counters, or None when they cannot be built here."""
    return _load("shm")


def _load(name: str) -> ctypes.CDLL | None:
    with _lock:
        if name not in _loaded:
            _loaded[name] = _build_and_load(LIBRARIES[name])
        return _loaded[name]


def _build_and_load(spec: NativeLibrary) -> ctypes.CDLL | None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None or not platform.system() == "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return _unavailable(spec, f"no C++ compiler found or unsupported platform "
                                  f"({platform.system()} {platform.machine()})")
    try:
        library = _cache_dir() / f"{spec.source.stem}-{_cache_key(compiler, spec.source)}.so"
        if not library.is_file():
            _compile(compiler, library, spec.source)
        lib = ctypes.CDLL(str(library))
        version = getattr(lib, spec.abi_symbol)()
        if version != spec.abi_version:
            return _unavailable(spec, f"{library}: ABI version {version}, expected {spec.abi_version}")
    except (OSError, subprocess.SubprocessError) as error:
        return _unavailable(spec, str(error))
    spec.declare(lib)
    return lib


def _compile(compiler: str, library: Path, source: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=library.stem + "-", suffix=".so.tmp", dir=library.parent)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *FLAGS, str(source), "-o", temporary],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise subprocess.SubprocessError(f"{compiler} failed on {source}:\n{result.stderr.strip()[-2000:]}")
        os.replace(temporary, library)  # atomic: concurrent builders each rename a complete file
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home_cache / "fvae-dist" / "native"


def _cache_key(compiler: str, source: Path) -> str:
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    for header in sorted(source.parent.glob("*.h")):  # what the sources may #include
        digest.update(header.read_bytes())
    digest.update(" ".join(FLAGS).encode())
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    digest.update(version.encode())
    digest.update(_cpu_flags().encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _declare_gru(lib: ctypes.CDLL) -> None:
    """Argument types, so ctypes passes 64-bit integers and pointers correctly."""
    long, ptr = ctypes.c_long, ctypes.c_void_p
    for suffix in ("f32", "bf16"):
        forward = getattr(lib, f"fvae_gru_forward_step_{suffix}")
        forward.argtypes = [long, long, ptr, long, ptr, ptr, ptr, ptr, ptr, ptr, ptr]
        forward.restype = None
        backward = getattr(lib, f"fvae_gru_backward_step_{suffix}")
        backward.argtypes = [long, long, ptr, long, ptr, ptr, ptr, ptr, ptr, long, ptr, ptr]
        backward.restype = None
    lib.fvae_gru_forward_f32.argtypes = [ptr, long, long, long, long, ptr, long, long, ptr, ptr, ptr, ptr, ptr, ptr,
                                         ptr]
    lib.fvae_gru_forward_f32.restype = None
    lib.fvae_gru_backward_f32.argtypes = [ptr, long, long, long, long, ptr, long, long, ptr, ptr, ptr, ptr, ptr, ptr,
                                          ptr, ptr, ptr, ptr, ptr]
    lib.fvae_gru_backward_f32.restype = None


def _declare_head(lib: ctypes.CDLL) -> None:
    long, ptr, single = ctypes.c_long, ctypes.c_void_p, ctypes.c_float
    lib.fvae_head_loss_and_grad.argtypes = [long, long, long, long, long, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                            single, single, single, single, ptr, ptr, ptr]
    lib.fvae_head_loss_and_grad.restype = None
    lib.fvae_head_work_size.argtypes = [long, long, long, long, long]
    lib.fvae_head_work_size.restype = long
    lib.fvae_head_step_f32.argtypes = [ptr, long, long, long, long, long, ptr, ptr, ptr, ptr, ptr, ptr, ptr, ptr,
                                       single, single, single, single, ptr, ptr, ptr, ptr, ptr]
    lib.fvae_head_step_f32.restype = None


def _declare_optim(lib: ctypes.CDLL) -> None:
    long, ptr, double = ctypes.c_long, ctypes.c_void_p, ctypes.c_double
    lib.fvae_sum_of_squares.argtypes = [long, ptr, ptr]
    lib.fvae_sum_of_squares.restype = double
    lib.fvae_adamw_step.argtypes = [long, ptr, ptr, ptr, ptr, ptr, ptr, double, double, double, double, double, double]
    lib.fvae_adamw_step.restype = None


def _declare_shm(lib: ctypes.CDLL) -> None:
    lib.fvae_shm_publish.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.fvae_shm_publish.restype = None
    lib.fvae_shm_wait_all.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int64, ctypes.c_int64]
    lib.fvae_shm_wait_all.restype = ctypes.c_int
    lib.fvae_shm_all_equal.argtypes = [ctypes.c_void_p, ctypes.c_long, ctypes.c_long, ctypes.c_int64]
    lib.fvae_shm_all_equal.restype = ctypes.c_int


def _unavailable(spec: NativeLibrary, reason: str) -> None:
    warnings.warn(f"fvae_dist native {spec.source.name} unavailable, {spec.fallback}: {reason}", RuntimeWarning,
                  stacklevel=4)
    return None


LIBRARIES = {
    "gru": NativeLibrary(Path(__file__).with_name("gru_cell.cpp"), "fvae_gru_abi_version", 5, _declare_gru,
                         "using torch.nn.GRU"),
    "head": NativeLibrary(Path(__file__).with_name("factor_head.cpp"), "fvae_head_abi_version", 2, _declare_head,
                          "computing FactorVAE's loss with the reference modules"),
    "optim": NativeLibrary(Path(__file__).with_name("adamw.cpp"), "fvae_optim_abi_version", 1, _declare_optim,
                           "stepping with torch's AdamW and clip_grad_norm_"),
    "shm": NativeLibrary(Path(__file__).with_name("shm_sync.cpp"), "fvae_shm_abi_version", 2, _declare_shm,
                         "averaging gradients through the process group"),
}
