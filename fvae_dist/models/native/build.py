"""Compile the native GRU step kernels (gru_cell.cpp) on first use and load them with ctypes.

    load_gru_kernels() -> ctypes.CDLL | None     None (with one warning) when unavailable

The library is built with the machine's C++ compiler (g++ or $CXX) for the machine's own CPU
(-march=native) and cached under $FVAE_DIST_NATIVE_CACHE, else ~/.cache/fvae-dist/native. The
cache key covers the source, the compiler, the flags and the CPU's feature flags, so a cache
directory shared between different machines never hands one a library built for another.
Several processes (Ray workers) may build at once: each writes its own temporary file and
renames it into place, so a reader never sees a half-written library.

No compiler, a failed build or FVAE_DIST_FUSED_GRU=0 all mean the same thing to callers: the
kernels are unavailable and the models use torch.nn.GRU (same function, slower).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("gru_cell.cpp")
ABI_VERSION = 2
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno")
DISABLE_ENV = "FVAE_DIST_FUSED_GRU"
CACHE_ENV = "FVAE_DIST_NATIVE_CACHE"

_lock = threading.Lock()
_loaded: dict[str, ctypes.CDLL | None] = {}


def load_gru_kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None when they are disabled or cannot be built here."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    with _lock:
        if "gru" not in _loaded:
            _loaded["gru"] = _build_and_load()
        return _loaded["gru"]


def _build_and_load() -> ctypes.CDLL | None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None or not platform.system() == "Linux" or platform.machine() not in ("x86_64", "aarch64"):
        return _unavailable(f"no C++ compiler found or unsupported platform "
                            f"({platform.system()} {platform.machine()})")
    try:
        library = _cache_dir() / f"gru_cell-{_cache_key(compiler)}.so"
        if not library.is_file():
            _compile(compiler, library)
        lib = ctypes.CDLL(str(library))
        if lib.fvae_gru_abi_version() != ABI_VERSION:
            return _unavailable(f"{library}: ABI version {lib.fvae_gru_abi_version()}, expected {ABI_VERSION}")
    except (OSError, subprocess.SubprocessError) as error:
        return _unavailable(str(error))
    _declare(lib)
    return lib


def _compile(compiler: str, library: Path) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=library.stem + "-", suffix=".so.tmp", dir=library.parent)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", temporary],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise subprocess.SubprocessError(f"{compiler} failed on {SOURCE}:\n{result.stderr.strip()[-2000:]}")
        os.replace(temporary, library)  # atomic: concurrent builders each rename a complete file
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    home_cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return home_cache / "fvae-dist" / "native"


def _cache_key(compiler: str) -> str:
    digest = hashlib.sha256()
    digest.update(SOURCE.read_bytes())
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


def _declare(lib: ctypes.CDLL) -> None:
    """Argument types, so ctypes passes 64-bit integers and pointers correctly."""
    long, ptr = ctypes.c_long, ctypes.c_void_p
    for suffix in ("f32", "bf16"):
        forward = getattr(lib, f"fvae_gru_forward_step_{suffix}")
        forward.argtypes = [long, long, ptr, long, ptr, ptr, ptr, ptr, ptr, ptr]
        forward.restype = None
        backward = getattr(lib, f"fvae_gru_backward_step_{suffix}")
        backward.argtypes = [long, long, ptr, long, ptr, ptr, ptr, ptr, ptr, long, ptr]
        backward.restype = None


def _unavailable(reason: str) -> None:
    warnings.warn(f"fvae_dist fused GRU kernels unavailable, using torch.nn.GRU: {reason}", RuntimeWarning,
                  stacklevel=3)
    return None
