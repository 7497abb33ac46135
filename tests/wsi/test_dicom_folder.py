"""A DICOM-WSI folder is one slide: one series, found among whatever else the folder holds."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pydicom
import pytest
from oncotrace import wsi

from tests.wsi import badinput


def _uids(files: list[Path]) -> list[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the camelyon file's over-long UIDs
        return [str(pydicom.dcmread(f, stop_before_pixels=True).SeriesInstanceUID) for f in files]


def test_a_folder_of_two_series_is_refused_naming_each_series_by_its_files(
    tmp_path: Path, shared_data: Path
) -> None:
    bad = badinput.make_two_series_dicom_folder(tmp_path, shared_data)
    files = sorted(bad.path.iterdir())
    assert len(set(_uids(files))) == 2  # the premise: really two series
    with pytest.raises(wsi.UnsupportedSlideError, match=bad.match) as err:
        wsi.open_slide(bad.path)
    text = str(err.value)
    for f in files:
        assert f.name in text
    assert "one folder per series" in err.value.fix
    for uid in _uids(files):  # UIDs embed dates and institution roots: never quoted
        assert uid not in text


def test_each_half_of_a_split_folder_opens_as_its_own_slide(
    tmp_path: Path, shared_data: Path
) -> None:
    """The fix the refusal names works: one folder per series gives each slide, whole."""
    bad = badinput.make_two_series_dicom_folder(tmp_path, shared_data)
    for rel in badinput.DICOM_SERIES:
        own = tmp_path / rel.parent.name
        own.mkdir()
        shutil.move(bad.path / rel.name, own / rel.name)
        with wsi.open_slide(own) as s, wsi.open_slide(shared_data / rel.parent) as ref:
            assert s.dimensions == ref.dimensions


def test_a_non_slide_dicom_beside_the_series_is_passed_over(
    tmp_path: Path, shared_data: Path
) -> None:
    """An ultrasound (any non-WSI SOP class) that sorts first used to be the file handed to
    OpenSlide, which then refused the whole folder."""
    folder = tmp_path / "node"
    folder.mkdir()
    other = shared_data / "ultrasound" / "lymph-node-power-doppler.dcm"
    wsi_file = shared_data / badinput.DICOM_SERIES[1]
    shutil.copyfile(other, folder / other.name)
    shutil.copyfile(wsi_file, folder / wsi_file.name)
    assert sorted(p.name for p in folder.iterdir())[0] == other.name  # the premise
    with wsi.open_slide(folder) as s, wsi.open_slide(wsi_file) as ref:
        assert s.dimensions == ref.dimensions == (1152, 700)
