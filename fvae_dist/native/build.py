"""Compile the shared-memory counters (shm_sync.cpp) on first use and load them with ctypes.

    load_shm_sync() -> ctypes.CDLL | None     the cross-process counters of the shared-memory
                                              all-reduce and step flags (train/shm_allreduce.py);
                                              None (with one warning) when unavailable

The library is built with the machine's C++ compiler (g++ or $CXX) and cached under
$FVAE_DIST_NATIVE_CACHE, else ~/.cache/fvae-dist/native; the cache key covers the source, the
compiler, the flags and the CPU's feature flags. Several processes may build at once: each
writes its own temporary file and renames it into place. Without it, DDP averages gradients
through its process group (gloo), as torch does by default.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# -fopenmp-simd: honour "#pragma omp simd reduction" (vectorised dot products) without OpenMP's
# threads or runtime library
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-fno-math-errno", "-fopenmp-simd")
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
    "shm": NativeLibrary(Path(__file__).with_name("shm_sync.cpp"), "fvae_shm_abi_version", 2, _declare_shm,
                         "averaging gradients through the process group"),
}
