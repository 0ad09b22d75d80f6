"""`python -m fvae_dist.accel build`: compile the fast paths' native code now (e.g. at image
build time, so cluster nodes never wait for a compiler); exits 1 with the reason if it cannot."""
from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print("usage: python -m fvae_dist.accel build", file=sys.stderr)
        return 2
    from fvae_dist.accel.extension import SOURCE, load_gru_loop, why_unavailable

    reason = why_unavailable()
    if reason is not None:
        print(f"fvae_dist.accel: cannot build {SOURCE.name}: {reason}", file=sys.stderr)
        return 1
    module = load_gru_loop(verbose=True)
    if module is None:
        return 1
    print(f"fvae_dist.accel: built {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
