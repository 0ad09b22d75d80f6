"""Build and load the GRU loop's C++ extension (accel/gru_loop.cpp) with torch's own tooling.

    load_gru_loop() -> module | None     the compiled extension, or None (one warning says why)
    python -m fvae_dist.accel build      compile it ahead of time (the Dockerfile does, at image time)

torch.utils.cpp_extension compiles the source with the machine's C++ compiler and ninja against
the installed torch, caches the result under $TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions) and rebuilds when the source, the flags or torch change; concurrent
builders (several Ray workers starting at once) wait on its lock instead of racing.

Flags: -O3, and on x86-64 the AVX2/FMA instruction sets (not -march=native: an image built on one
machine runs on others). A CPU that torch itself does not run with AVX2 gets no extension.
"""
from __future__ import annotations

import functools
import platform
import shutil
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("gru_loop.cpp")
NAME = "fvae_dist_gru_loop_v1"


def compile_flags() -> list[str]:
    flags = ["-O3", "-std=c++17"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags += ["-mavx2", "-mfma"]
    return flags


def why_unavailable() -> str | None:
    """None when the extension can be built here, else the reason in one line."""
    import torch

    if platform.system() != "Linux":
        return f"only built on Linux (this is {platform.system()})"
    if platform.machine() in ("x86_64", "AMD64") and torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"this CPU runs torch without AVX2 ({torch.backends.cpu.get_cpu_capability()})"
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        return "no C++ compiler found (install g++)"
    if shutil.which("ninja") is None:
        try:
            import ninja  # noqa: F401  (the PyPI package puts the binary on PATH of the venv)
        except ImportError:
            return "ninja not found (pip install ninja)"
    return None


@functools.cache
def load_gru_loop(verbose: bool = False):
    """The extension module (forward, backward), or None with one RuntimeWarning naming why."""
    reason = why_unavailable()
    if reason is None:
        try:
            from torch.utils.cpp_extension import load

            return load(name=NAME, sources=[str(SOURCE)], extra_cflags=compile_flags(), verbose=verbose)
        except Exception as error:  # noqa: BLE001 - any build failure means: run without the path
            reason = f"building {SOURCE.name} failed: {str(error).strip().splitlines()[-1] if str(error).strip() else error!r}"
    warnings.warn(f"fvae_dist.accel: the CPU GRU loop is unavailable ({reason}); torch.nn.GRU runs instead "
                  "(the same function, slower on CPU)", RuntimeWarning, stacklevel=2)
    return None
