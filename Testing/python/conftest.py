"""Shared pytest fixtures for the ssanet tests."""

import importlib.util
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


@pytest.fixture(scope="session")
def script():
    """Import one of the repository's scripts/NAME.py as a module (they are not a package)."""
    folder = Path(__file__).resolve().parents[2] / "scripts"

    def load(name):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load
