"""Every name a package exports in ``__all__`` resolves, and nothing is listed twice."""

from __future__ import annotations

import importlib

import pytest

PACKAGES = tuple(f"oncotrace.{stage}" for stage in ("wsi", "mil", "spatial", "workflows"))


@pytest.mark.parametrize("package", PACKAGES)
def test_all_names_resolve(package: str) -> None:
    module = importlib.import_module(package)
    exported = module.__all__
    assert all(isinstance(name, str) for name in exported)
    assert len(set(exported)) == len(exported), f"duplicates in {package}.__all__"
    missing = [name for name in exported if not hasattr(module, name)]
    assert not missing, f"{package}.__all__ lists names it does not define: {missing}"


def test_wsi_exports_the_slide_api() -> None:
    from oncotrace import wsi

    assert {"open_slide", "Slide", "Mpp", "SlideError", "EXPORTED_PROPERTIES"} <= set(wsi.__all__)
    for name in ("UnsupportedSlideError", "CorruptSlideError", "MppError"):
        error = getattr(wsi, name)
        assert issubclass(error, wsi.SlideError) and issubclass(error, ValueError)
