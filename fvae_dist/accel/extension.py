"""Build and load the GRU loop's C++ extension (accel/gru_loop.cpp) with torch's own tooling.

    load_gru_loop() -> module | None     the compiled extension, or None (one warning says why)
    python -m fvae_dist.accel build      compile it ahead of time (the Dockerfile does, at image time)

torch.utils.cpp_extension compiles the source with the machine's C++ compiler and ninja against
the installed torch, caches the result under $TORCH_EXTENSIONS_DIR (default
~/.cache/torch_extensions) in a folder named after what it was built from (build_name), and
builds once per source, flags and torch; concurrent builders (several Ray workers starting at
once) wait for one another, and a builder killed midway does not block the next (exclusive_build).

Flags: -O3, -fno-trapping-math (what lets gcc vectorise the forward gates), and on x86-64 the
AVX2/FMA instruction sets (not -march=native: an image built on one machine runs on others). A
CPU that torch itself does not run with AVX2 gets no extension.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import platform
import shutil
import warnings
from pathlib import Path

SOURCE = Path(__file__).with_name("gru_loop.cpp")
NAME = "fvae_dist_gru_loop_v1"


def compile_flags() -> list[str]:
    # -fno-trapping-math: gcc may then assume that no floating-point exception flag is read (none
    # is), which lets it vectorise exp_approx's clamps; the results are bit-identical
    flags = ["-O3", "-std=c++17", "-fno-trapping-math"]
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


def build_name() -> str:
    """NAME plus a digest of what the build depends on (the source, the flags, which torch): one
    build per code and environment, so two checkouts or venvs on one machine never rebuild over
    each other's."""
    import torch

    key = SOURCE.read_bytes() + " ".join(compile_flags()).encode() + f"{torch.__version__} {torch.__file__}".encode()
    return f"{NAME}_{hashlib.sha256(key).hexdigest()[:12]}"


@contextlib.contextmanager
def exclusive_build(build_dir: Path):
    """Hold the build folder for this process, and clear what a killed builder left behind.

    torch's own build lock is a file that a builder deletes when it is done; one killed midway
    (a run stopped, a node lost) leaves it, and every later load waits on it forever. This flock
    is released by the kernel when its holder dies, so whoever holds it knows nobody else is
    building and that any torch lock file present is stale."""
    build_dir.mkdir(parents=True, exist_ok=True)
    with open(build_dir / ".fvae-build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build_dir / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@functools.cache
def load_gru_loop(verbose: bool = False):
    """The extension module (forward, backward), or None with one RuntimeWarning naming why."""
    reason = why_unavailable()
    if reason is None:
        try:
            from torch.utils.cpp_extension import get_default_build_root, load

            name = build_name()
            build_dir = Path(get_default_build_root()) / name  # honours TORCH_EXTENSIONS_DIR
            with exclusive_build(build_dir):
                return load(name=name, sources=[str(SOURCE)], extra_cflags=compile_flags(),
                            build_directory=str(build_dir), verbose=verbose)
        except Exception as error:  # noqa: BLE001 - any build failure means: run without the path
            reason = f"building {SOURCE.name} failed: {str(error).strip().splitlines()[-1] if str(error).strip() else error!r}"
    warnings.warn(f"fvae_dist.accel: the CPU GRU loop is unavailable ({reason}); torch.nn.GRU runs instead "
                  "(the same function, slower on CPU)", RuntimeWarning, stacklevel=2)
    return None
