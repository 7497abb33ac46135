"""Fixtures shared by every test package. Keep this small; generators live in modules."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
#: Real slides, DICOM and images published by others (see its MANIFEST.md); never copied here.
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def require_shared_data() -> Path:
    """Return the shared data root, or skip (fail under ``CI``) when it is not checked out."""
    if not (SHARED_DATA / "MANIFEST.md").is_file():
        message = (
            f"shared test data not found at {SHARED_DATA}; it must sit beside the repository"
            " as ../shared/data (see its MANIFEST.md)."
        )
        if os.environ.get("CI"):
            pytest.fail(message + " CI is set, so this is an error, not a skip.")
        pytest.skip(message)
    return SHARED_DATA


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of the real test data (``../shared/data``); skips, or fails under ``CI``, if absent."""
    return require_shared_data()
