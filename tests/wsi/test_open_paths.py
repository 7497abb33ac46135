"""open_slide says what a path is when it cannot be a slide: a link it cannot follow, a folder."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from oncotrace import wsi
from oncotrace.wsi.synthetic import make_tissue_squares


def test_a_dangling_link_names_its_target(tmp_path: Path) -> None:
    link = tmp_path / "slide.svs"
    os.symlink("/mnt/scanner-share/slide.svs", link)  # an unmounted share
    with pytest.raises(
        wsi.UnsupportedSlideError, match=re.escape("'/mnt/scanner-share/slide.svs'")
    ) as err:
        wsi.open_slide(link)  # was: "the file does not exist. Fix: check the path."
    assert "remove the link" in err.value.fix


def test_a_loop_of_links_is_said_to_be_one(tmp_path: Path) -> None:
    a, b = tmp_path / "a.svs", tmp_path / "b.svs"
    os.symlink(b.name, a)
    os.symlink(a.name, b)
    with pytest.raises(wsi.UnsupportedSlideError, match="loop of links"):
        wsi.open_slide(a)  # was: "the file does not exist"


def test_a_folder_named_like_a_slide_file_is_said_to_be_one(tmp_path: Path) -> None:
    unpacked = tmp_path / "slide.svs"
    unpacked.mkdir()
    (unpacked / "Data0001.dat").write_bytes(b"\0" * 16)
    with pytest.raises(
        wsi.UnsupportedSlideError, match=re.escape("folder named like a .svs file")
    ) as err:
        wsi.open_slide(unpacked)  # was: "the folder holds no .dcm files"
    assert "put the slide file itself" in err.value.fix


def test_a_folder_of_slides_says_to_name_them(tmp_path: Path) -> None:
    folder = tmp_path / "batch2"
    folder.mkdir()
    make_tissue_squares(folder / "s.tiff", size=(512, 512), levels=1, squares=[(0, 0, 256, 256)])
    with pytest.raises(wsi.UnsupportedSlideError, match="not a DICOM-WSI slide") as err:
        wsi.open_slide(folder)
    assert "name its files" in err.value.fix


def test_a_link_to_a_slide_still_opens(tmp_path: Path) -> None:
    real = tmp_path / "real.tiff"
    make_tissue_squares(real, size=(512, 512), levels=1, squares=[(0, 0, 256, 256)])
    link = tmp_path / "link.tiff"
    os.symlink(real.name, link)
    with wsi.open_slide(link) as s:
        assert s.dimensions == (512, 512)
