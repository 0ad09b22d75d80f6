"""Shared test fixtures: where the real data lives, and small synthetic data sets."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the repository; FVAE_SHARED_DIR points elsewhere (e.g. from a git worktree)
SHARED = Path(os.environ.get("FVAE_SHARED_DIR") or REPO_ROOT / ".." / "shared").resolve()
CSI300_DIR = SHARED / "data" / "cn_csi300"
REFERENCE_DIR = SHARED / "reference"


@pytest.fixture(scope="session")
def csi300_dir() -> Path:
    if not (CSI300_DIR / "stocks_daily.parquet").is_file():
        pytest.skip(f"real CSI300 data not found at {CSI300_DIR} (expected ../shared beside the repository)")
    return CSI300_DIR
