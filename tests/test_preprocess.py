"""inference/preprocess.py on real radiographs (pydicom-data), re-encoded copies and CT series."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from inference import preprocess
from inference.preprocess import (
    MAX_CT_SLICES,
    PreprocessError,
    SquareGeometry,
    attach_regions,
    box_2d_to_region,
    prepare_study,
    region_to_box_2d,
    sample_evenly,
)
from storage.report_schema import Finding, ParseStatus, PixelRegion, ReportContent


def bundled(name: str) -> Path:
    """A file shipped with pydicom or pydicom-data; never downloaded."""
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.fail(f"{name} is not bundled with pydicom/pydicom-data")
    return Path(str(path))


@pytest.fixture(scope="module")
def chest_uncompressed() -> Dataset:
    return dcmread(bundled("RG1_UNCI.dcm"))


def unpadded(image: np.ndarray, geometry: SquareGeometry) -> np.ndarray:
    r, c = geometry.row_offset, geometry.column_offset
    return image[r : r + geometry.rows, c : c + geometry.columns]


def make_dataset(
    pixels: np.ndarray,
    photometric: str,
    modality: str = "OT",
    sop_class: str = SecondaryCaptureImageStorage,
    bits: int = 8,
    **attributes: object,
) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Modality = modality
    ds.set_pixel_data(pixels, photometric, bits)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def synthetic_cr() -> tuple[Dataset, tuple[slice, slice]]:
    """A 12-bit MONOCHROME1 CR, 90 x 150, with a block of low stored values (shown white)."""
    rows = np.linspace(500, 3500, 90)[:, None]
    pixels = np.repeat(rows, 150, axis=1).astype(np.uint16)
    block = (slice(30, 50), slice(60, 100))
    pixels[block] = 100
    ds = make_dataset(
        pixels,
        "MONOCHROME1",
        modality="CR",
        sop_class=ComputedRadiographyImageStorage,
        bits=12,
        WindowCenter=2000,
        WindowWidth=4000,
        BodyPartExamined="HAND",
    )
    return ds, block


# --------------------------------------------------------------------------- radiographs


def test_chest_cr_uncompressed_and_jpeg2000_give_the_same_picture() -> None:
    plain = prepare_study([bundled("RG1_UNCI.dcm")])
    j2k = prepare_study([bundled("RG1_J2KI.dcm")])
    assert plain.modality == "CR" and plain.body_part == "CHEST"
    assert plain.geometries[0] == j2k.geometries[0]
    assert plain.images[0].size == (1955, 1955)  # 1955 rows x 1841 columns, padded
    a = np.asarray(plain.images[0], dtype=np.int16)
    b = np.asarray(j2k.images[0], dtype=np.int16)
    difference = np.abs(a - b)
    assert difference.mean() < 1.0
    assert np.percentile(difference, 99.9) <= 8


def test_chest_cr_follows_the_grayscale_pipeline(chest_uncompressed: Dataset) -> None:
    """Rendered pixels equal pydicom's Modality LUT + window, inverted for MONOCHROME1."""
    ds = chest_uncompressed
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    study = prepare_study([ds])
    rendered = unpadded(np.asarray(study.images[0])[:, :, 0], study.geometries[0])

    windowed = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    top = 2**ds.BitsStored - 1  # linear window output range for unsigned data, PS3.3 C.11.2.1.2
    expected = 255 - np.rint(np.clip(windowed / top, 0, 1) * 255)
    assert np.abs(rendered.astype(int) - expected.astype(int)).max() <= 1

    padded = np.asarray(study.images[0])
    assert padded[:, : study.geometries[0].column_offset].max() == 0  # black padding


@pytest.mark.parametrize(
    ("center", "width", "signed"), [(None, None, False), (-600.0, 1500.0, True), (40.0, 2.0, True)]
)
def test_linear_window_matches_pydicoms_window_and_output_range(
    chest_uncompressed: Dataset, center: float | None, width: float | None, signed: bool
) -> None:
    """The direct LINEAR window (the common case, done in float32) gives pydicom's window
    followed by the map of its output range onto 0..255: the chest CR's own window, and a
    signed, rescaled image with a lung window and the narrowest LINEAR one (width 2)."""
    ds = copy.deepcopy(chest_uncompressed)
    values = apply_modality_lut(ds.pixel_array, ds)
    if signed:
        values = values.astype(np.float64) - 2048.0  # Rescale Intercept -2048: HU-like
        ds.WindowCenter, ds.WindowWidth = [center, center + 100], [width, width]  # first used
        ds.PixelRepresentation, ds.RescaleIntercept, ds.RescaleSlope = 1, -2048, 1
    window = preprocess._linear_window(ds)
    assert window is not None
    direct = preprocess._to_uint8(values, *window)
    low, high = preprocess._voi_output_range(ds)
    generic = preprocess._to_uint8(apply_voi_lut(values, ds, index=0), low, high)
    difference = np.abs(direct.astype(int) - generic.astype(int))
    assert difference.max() <= 1 and (difference == 0).mean() > 0.999
    assert len(np.unique(direct)) > (1 if width == 2.0 else 100)  # not a blank image


def test_other_voi_transforms_are_left_to_pydicom(chest_uncompressed: Dataset) -> None:
    ds = copy.deepcopy(chest_uncompressed)
    ds.VOILUTFunction = "SIGMOID"
    assert preprocess._linear_window(ds) is None
    ds.VOILUTFunction = "LINEAR"
    ds.WindowWidth = 1  # the step function of width 1
    assert preprocess._linear_window(ds) is None
    del ds.WindowCenter
    assert preprocess._linear_window(ds) is None


def test_chest_lungs_are_dark_and_mediastinum_bright(chest_uncompressed: Dataset) -> None:
    study = prepare_study([chest_uncompressed])
    image = unpadded(np.asarray(study.images[0])[:, :, 0], study.geometries[0]).astype(float)
    rows, cols = image.shape
    band = slice(int(rows * 0.30), int(rows * 0.40))
    right_lung = image[band, int(cols * 0.20) : int(cols * 0.30)].mean()
    left_lung = image[band, int(cols * 0.70) : int(cols * 0.80)].mean()
    mediastinum = image[band, int(cols * 0.47) : int(cols * 0.53)].mean()
    assert mediastinum > right_lung + 40
    assert mediastinum > left_lung + 40
    # Stored values run the other way (MONOCHROME1: minimum is white).
    stored = chest_uncompressed.pixel_array.astype(float)
    assert (
        stored[band, int(cols * 0.20) : int(cols * 0.30)].mean()
        > stored[band, int(cols * 0.47) : int(cols * 0.53)].mean()
    )


def test_percentile_window_when_the_instance_has_no_voi() -> None:
    ds, block = synthetic_cr()
    del ds.WindowCenter, ds.WindowWidth
    study = prepare_study([ds])
    image = unpadded(np.asarray(study.images[0])[:, :, 0], study.geometries[0])
    stored = ds.pixel_array.astype(float)
    low, high = np.percentile(stored, [0.5, 99.5])
    expected = 255 - np.rint(np.clip((stored - low) / (high - low), 0, 1) * 255)
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1
    # The block holds 800 of 13500 pixels, below the 0.5th percentile: white after inversion.
    assert (image[block] == 255).all()
    assert (image[89] == 0).all()  # the last row holds the highest stored values: black


def test_voi_lut_sequence_of_a_real_file() -> None:
    ds = dcmread(bundled("vlut_04.dcm"))
    study = prepare_study([ds])
    rendered = unpadded(np.asarray(study.images[0])[:, :, 0], study.geometries[0]).astype(int)
    lut = apply_voi_lut(ds.pixel_array, ds)
    data = np.asarray(ds.VOILUTSequence[0].LUTData, dtype=float)
    expected = np.rint((lut - data.min()) / (data.max() - data.min()) * 255)
    assert np.abs(rendered - expected).max() <= 1


def test_voi_lut_sequence_beats_the_window_and_uses_its_data_range() -> None:
    """A square-root VOI LUT of 12-bit values declared as 16 bits (PS3.3 C.11.2.1.1)."""
    ds, _ = synthetic_cr()
    ds.PhotometricInterpretation = "MONOCHROME2"
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    lut = np.rint(np.sqrt(np.arange(4096) / 4095) * 4095).astype(int)
    item.add_new("LUTData", "US", lut.tolist())
    ds.VOILUTSequence = [item]
    study = prepare_study([ds])
    rendered = unpadded(np.asarray(study.images[0])[:, :, 0], study.geometries[0]).astype(int)
    expected = np.rint(lut[ds.pixel_array] / 4095 * 255)
    assert np.abs(rendered - expected).max() <= 1
    assert rendered.max() > 200  # scaled by the data range, not by 2**16


def test_monochrome1_window_inverts_and_pads_centred() -> None:
    ds, block = synthetic_cr()
    study = prepare_study([ds])
    geometry = study.geometries[0]
    assert (geometry.rows, geometry.columns, geometry.side) == (90, 150, 150)
    assert (geometry.row_offset, geometry.column_offset) == (30, 0)
    image = np.asarray(study.images[0])
    assert image[:30].max() == 0 and image[120:].max() == 0
    inner = unpadded(image[:, :, 0], geometry)
    assert (inner[block] > 240).all()  # low stored values are white in MONOCHROME1
    assert inner[5, 5] > inner[85, 5]  # brightness falls as stored values rise


def _encoded(ds: Dataset, syntax: str, tmp_path: Path) -> Path:
    encoded = copy.deepcopy(ds)
    if syntax == DeflatedExplicitVRLittleEndian:
        encoded.file_meta.TransferSyntaxUID = syntax
    elif syntax != ExplicitVRLittleEndian:
        encoded.compress(syntax)
    path = tmp_path / f"{syntax}.dcm"
    encoded.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize(
    "syntax",
    [
        ExplicitVRLittleEndian,
        DeflatedExplicitVRLittleEndian,
        RLELossless,
        JPEGLSLossless,
        JPEG2000Lossless,
    ],
)
def test_lossless_transfer_syntaxes_render_identically(syntax: str, tmp_path: Path) -> None:
    ds, _ = synthetic_cr()
    reference = np.asarray(prepare_study([ds]).images[0])
    path = _encoded(ds, syntax, tmp_path)
    assert dcmread(path).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(np.asarray(prepare_study([path]).images[0]), reference)


@pytest.mark.parametrize(
    ("encoded", "reference", "tolerance"),
    [
        ("SC_rgb_jpeg_dcmtk.dcm", "SC_rgb.dcm", 8),  # JPEG baseline, YBR_FULL
        ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb.dcm", 0),  # JPEG lossless SV1
        ("SC_rgb_rle.dcm", "SC_rgb.dcm", 0),  # RLE
        ("SC_rgb_gdcm_KY.dcm", "SC_rgb.dcm", 0),  # JPEG 2000
        ("SC_ybr_full_uncompressed.dcm", "SC_rgb.dcm", 8),  # YBR_FULL, uncompressed
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm", 0),  # JPEG-LS
        ("MR_small_RLE.dcm", "MR_small.dcm", 0),
        ("JPEG2000.dcm", "JPEG2000_UNC.dcm", 0),
    ],
)
def test_bundled_encodings_match_their_uncompressed_twin(
    encoded: str, reference: str, tolerance: int
) -> None:
    a = np.asarray(prepare_study([bundled(encoded)]).images[0], dtype=int)
    b = np.asarray(prepare_study([bundled(reference)]).images[0], dtype=int)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= tolerance
    assert a.std() > 10  # a real picture, not a blank


@pytest.mark.parametrize("name", ["JPEG-LL.dcm", "image_dfl.dcm"])
def test_other_bundled_syntaxes_decode(name: str) -> None:
    image = np.asarray(prepare_study([bundled(name)]).images[0])
    assert image.std() > 5


def test_rgb_stays_colour_and_ybr_full_converts(tmp_path: Path) -> None:
    rgb = np.zeros((40, 60, 3), dtype=np.uint8)
    rgb[:, :20] = (220, 30, 30)  # red
    rgb[:, 20:40] = (30, 200, 40)  # green
    rgb[:, 40:] = (20, 40, 230)  # blue
    as_rgb = make_dataset(rgb, "RGB")
    ybr_pixels = convert_color_space(rgb, "RGB", "YBR_FULL")
    as_ybr = make_dataset(ybr_pixels, "YBR_FULL")
    path = tmp_path / "ybr.dcm"
    as_ybr.save_as(path, enforce_file_format=True)
    for source in (as_rgb, path):
        study = prepare_study([source])
        image = unpadded(np.asarray(study.images[0]), study.geometries[0]).astype(int)
        assert np.abs(image[20, 10] - (220, 30, 30)).max() <= 3
        assert np.abs(image[20, 30] - (30, 200, 40)).max() <= 3
        assert np.abs(image[20, 50] - (20, 40, 230)).max() <= 3


def test_undecodable_instance_is_skipped_and_the_study_goes_on() -> None:
    """The bundled 12-bit JPEG Extended sample does not decode with pylibjpeg-libjpeg."""
    ds, _ = synthetic_cr()
    study = prepare_study([bundled("JPEG-lossy.dcm"), ds])
    assert study.sop_instance_uids == [ds.SOPInstanceUID]
    assert len(study.skipped) == 1 and "cannot render" in study.skipped[0]


def test_no_pixel_data_is_an_error() -> None:
    ds, _ = synthetic_cr()
    del ds.PixelData
    with pytest.raises(PreprocessError, match="no instance with Pixel Data"):
        prepare_study([ds])


# --------------------------------------------------------------------------- chest view order


def _view(view: str | None, number: int, body_part: str = "CHEST") -> Dataset:
    pixels = np.full((20, 16), 100 * number, dtype=np.uint16)
    ds = make_dataset(pixels, "MONOCHROME2", modality="DX", bits=12, InstanceNumber=number)
    ds.BodyPartExamined = body_part
    if view is not None:
        ds.ViewPosition = view
    return ds


def test_chest_frontal_first_then_lateral() -> None:
    lateral, ap, pa = _view("LL", 1), _view("AP", 2), _view("PA", 3)
    study = prepare_study([lateral, ap, pa])
    assert study.sop_instance_uids == [pa.SOPInstanceUID, lateral.SOPInstanceUID]
    assert study.body_part == "CHEST" and study.modality == "DX"

    study = prepare_study([lateral, ap])
    assert study.sop_instance_uids == [ap.SOPInstanceUID, lateral.SOPInstanceUID]

    unknown = _view(None, 4)
    study = prepare_study([_view("RL", 5), unknown])
    assert study.sop_instance_uids[0] == unknown.SOPInstanceUID

    thorax = _view("AP", 6, body_part="THORAX")
    assert prepare_study([thorax]).body_part == "CHEST"


def test_non_chest_radiographs_keep_instance_order() -> None:
    views = [_view(None, n, body_part="HAND") for n in (3, 1, 2)]
    study = prepare_study(views)
    assert [int(dcm.InstanceNumber) for dcm in views] == [3, 1, 2]
    assert study.sop_instance_uids == [
        views[1].SOPInstanceUID,
        views[2].SOPInstanceUID,
        views[0].SOPInstanceUID,
    ]
    assert study.body_part == "HAND"


# --------------------------------------------------------------------------- CT


def _ct_series(
    template: Dataset, count: int, orientation: list[float], tmp_path: Path, name: str
) -> list[Path]:
    series_uid = generate_uid()
    paths = []
    for number in range(1, count + 1):
        ds = copy.deepcopy(template)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = number
        ds.ImageOrientationPatient = orientation
        ds.ImagePositionPatient = [0.0, 0.0, float(number)]
        path = tmp_path / f"{name}_{number:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_ct_picks_the_axial_series_samples_and_windows(tmp_path: Path) -> None:
    template = dcmread(bundled("CT_small.dcm"))
    axial = _ct_series(template, 100, [1, 0, 0, 0, 1, 0], tmp_path, "axial")
    coronal = _ct_series(template, 120, [1, 0, 0, 0, 0, -1], tmp_path, "coronal")
    report_like = copy.deepcopy(template)
    del report_like.PixelData
    sources = [*reversed(axial), *coronal, report_like]

    study = prepare_study(sources)

    assert study.modality == "CT"
    assert len(study.images) == MAX_CT_SLICES
    numbers = [int(dcmread(p, stop_before_pixels=True).InstanceNumber) for p in axial]
    by_uid = {
        str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): n
        for p, n in zip(axial, numbers, strict=True)
    }
    chosen = [by_uid[uid] for uid in study.sop_instance_uids]  # all from the axial series
    assert chosen == [i + 1 for i in sample_evenly(100, MAX_CT_SLICES)]
    assert chosen[0] == 1 and chosen[-1] == 100

    hu = template.pixel_array.astype(float) * float(template.RescaleSlope) + float(
        template.RescaleIntercept
    )
    image = np.asarray(study.images[0]).astype(int)
    for channel, (low, high) in enumerate([(-1024, 1024), (-135, 215), (0, 80)]):
        expected = np.rint(np.clip((hu - low) / (high - low), 0, 1) * 255)
        assert np.abs(image[:, :, channel] - expected).max() <= 1


def test_sample_evenly_spreads_and_keeps_the_ends() -> None:
    assert sample_evenly(10, 85) == list(range(10))
    picked = sample_evenly(400, 85)
    assert len(picked) == 85 and picked[0] == 0 and picked[-1] == 399
    gaps = np.diff(picked)
    assert gaps.max() - gaps.min() <= 1


def test_multiframe_mr_uses_every_frame() -> None:
    study = prepare_study([bundled("emri_small_jpeg_2k_lossless.dcm")])
    assert study.modality == "MR"
    assert len(study.images) == 10
    assert [g.frame_number for g in study.geometries] == list(range(1, 11))
    for image in study.images:
        pixels = np.asarray(image)
        assert pixels.min() == 0 and pixels.max() == 255  # min/max per slice


# --------------------------------------------------------------------------- boxes


def test_box_maps_to_pixels_through_the_centred_padding() -> None:
    geometry = SquareGeometry.for_image("1.2.3", rows=1000, columns=500)
    assert (geometry.side, geometry.column_offset, geometry.row_offset) == (1000, 250, 0)
    region = box_2d_to_region([100, 300, 200, 400], geometry)
    assert region is not None
    assert (region.x0, region.y0, region.x1, region.y1) == (50, 100, 150, 200)
    clipped = box_2d_to_region([0, 200, 1000, 900], geometry)
    assert clipped is not None and (clipped.x0, clipped.x1) == (0, 500)
    assert box_2d_to_region([100, 0, 200, 200], geometry) is None  # all in the padding


def test_attach_regions_uses_the_image_of_each_finding() -> None:
    frontal = SquareGeometry.for_image("1.1", rows=200, columns=100)
    lateral = SquareGeometry.for_image("1.2", rows=100, columns=100, frame_number=None)
    content = ReportContent(
        parse_status=ParseStatus.OK,
        findings=[
            Finding(label="a", box_2d=[0, 250, 500, 750], image_index=0),
            Finding(label="b", box_2d=[0, 0, 1000, 1000], image_index=1),
            Finding(label="c"),
        ],
    )
    mapped = attach_regions(content, [frontal, lateral])
    first, second, third = mapped.findings
    assert first.region == PixelRegion(sop_instance_uid="1.1", x0=0, y0=0, x1=100, y1=100)
    assert second.region == PixelRegion(sop_instance_uid="1.2", x0=0, y0=0, x1=100, y1=100)
    assert third.region is None


@st.composite
def image_and_box(draw: st.DrawFn) -> tuple[SquareGeometry, PixelRegion]:
    rows = draw(st.integers(1, 4000))
    columns = draw(st.integers(1, 4000))
    xs = sorted(draw(st.floats(0, columns)) for _ in range(2))
    ys = sorted(draw(st.floats(0, rows)) for _ in range(2))
    geometry = SquareGeometry.for_image("1.2.3", rows=rows, columns=columns)
    region = PixelRegion(sop_instance_uid="1.2.3", x0=xs[0], y0=ys[0], x1=xs[1], y1=ys[1])
    return geometry, region


def _corner_error(a: PixelRegion, b: PixelRegion) -> float:
    return max(abs(a.x0 - b.x0), abs(a.y0 - b.y0), abs(a.x1 - b.x1), abs(a.y1 - b.y1))


@settings(max_examples=300, deadline=None)
@given(image_and_box())
def test_box_round_trip_lands_within_one_pixel(case: tuple[SquareGeometry, PixelRegion]) -> None:
    geometry, region = case
    box = region_to_box_2d(region, geometry)
    assert all(0 <= v <= 1000 for v in box)
    back = box_2d_to_region(box, geometry)
    assert back is not None
    assert _corner_error(back, region) <= 1.0
    # The model answers in whole units of 1000: half a unit of error, one pixel up to 2000 px.
    rounded = box_2d_to_region([round(v) for v in box], geometry)
    assert rounded is not None
    assert _corner_error(rounded, region) <= geometry.side / 2000 + 1e-9


def test_enhanced_ct_uses_functional_group_rescale_per_frame() -> None:
    """Enhanced CT (PS3.3 A.38): orientation and rescale live in the functional groups."""
    ds = dcmread(bundled("eCT_Supplemental.dcm"))
    assert "RescaleSlope" not in ds  # only in the Pixel Value Transformation macro
    study = prepare_study([ds])
    assert study.modality == "CT"
    assert [g.frame_number for g in study.geometries] == [1, 2]
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = ds.pixel_array[1].astype(float) * float(transform.RescaleSlope) + float(
        transform.RescaleIntercept
    )
    expected = np.rint(np.clip((hu + 1024) / 2048, 0, 1) * 255)
    assert np.abs(np.asarray(study.images[1])[:, :, 0].astype(int) - expected).max() <= 1
