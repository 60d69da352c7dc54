"""Shared pytest fixtures for the ssanet tests."""

import os
from pathlib import Path

import pytest


def _find_data_root():
    env = os.environ.get("SSALESIONSEG_DATA")
    if env:
        return Path(env).expanduser()
    # Colleagues' checkouts keep the read-only real data beside the repository.
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_root():
    """The real-data root (SSALESIONSEG_DATA, else <repo>/../shared/data); skips when absent."""
    root = _find_data_root()
    if not (root / "medseg100").is_dir() or not (root / "covid-semiseg").is_dir():
        pytest.skip(f"real data not found at {root}: set SSALESIONSEG_DATA to the folder holding "
                    "medseg100/ and covid-semiseg/ to run the real-data tests")
    return root
