"""LlavaUhdImageProcessor: slice layouts against the reference, invariants, pixel layout, input kinds and errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from tiny import gradient, make_processor, photo, spatial_schema

from modeling_llava_uhd import LlavaUhdImageProcessor, SliceLayout
from modeling_llava_uhd.image_processing_llava_uhd import NO_PRE_RESIZE

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "slice_layouts_reference.json").read_text())
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073])
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711])
RAW = LlavaUhdImageProcessor(max_image_size=NO_PRE_RESIZE)
PRE = LlavaUhdImageProcessor()  # default: long side pre-resized to 1024, as the reference evaluation does
SCHEMA = make_processor(num_queries=3)


def _as_layout(entry: dict) -> tuple:
    """A reference layout, (W, H) sizes and a (cols, rows) grid, as our (h, w) sizes and (rows, cols) grid."""
    flip = lambda pair: None if pair is None else tuple(pair[::-1])  # noqa: E731
    return flip(entry["overview"]), flip(entry["grid"]), flip(entry["slice"])


def _ours(layout: SliceLayout) -> tuple:
    return layout.overview_size, layout.grid, layout.slice_size


def check_valid(layout: SliceLayout, max_slice_nums: int, patch: int = 14) -> None:
    """What every layout guarantees, whatever the input size."""
    sizes = [layout.overview_size] + ([layout.slice_size] if layout.grid else [])
    assert all(side >= patch and side % patch == 0 for size in sizes for side in size), layout
    assert (layout.grid is None) == (layout.slice_size is None)
    if layout.grid is not None:
        rows, cols = layout.grid
        assert rows >= 1 and cols >= 1 and 2 <= rows * cols <= max_slice_nums, layout


# ---------------------------------------------------------------------------------------------------- layouts


def test_layouts_match_every_reference_entry():
    compared = 0
    for entry in REFERENCE:
        height, width, limit = entry["height"], entry["width"], entry["max_slice_nums"]
        raw = RAW.get_slice_layout(height, width, limit)
        assert _ours(raw) == _as_layout(entry), entry
        assert raw.image_size == (height, width) and raw.num_slices == entry["num_slices"]

        pre = PRE.get_slice_layout(height, width, limit)
        check_valid(pre, limit)
        if "preresized_error" in entry:
            # The reference asks PIL for a 0-pixel side and crashes; we keep that side at 1 pixel instead.
            assert 0 in entry["preresized_size"]
            assert pre.image_size[::-1] == tuple(max(side, 1) for side in entry["preresized_size"])
        else:
            assert pre.image_size[::-1] == tuple(entry["preresized_size"]), entry
            assert _ours(pre) == _as_layout(entry["preresized"]), entry
            compared += 1
    assert compared == len(REFERENCE) - 146


def test_reference_crashes_give_the_references_layout_of_the_one_pixel_side():
    """Where the reference's pre-resize crashed (e.g. 1x1088 -> 0x1024), we give what it does for 1x1024."""
    raw_entries = {(e["width"], e["height"], e["max_slice_nums"]): e for e in REFERENCE}
    matched = 0
    for entry in (e for e in REFERENCE if "preresized_error" in e):
        layout = PRE.get_slice_layout(entry["height"], entry["width"], entry["max_slice_nums"])
        reference = raw_entries.get((*layout.image_size[::-1], entry["max_slice_nums"]))
        if reference is not None:
            assert _ours(layout) == _as_layout(reference), entry
            matched += 1
    assert matched >= 90  # every max_slice_nums=7 entry: the dense grid holds 1x1024 and 1024x1


# (W, H) -> the pre-resized (W, H) of REFERENCE.md's `int((1024 / W) * H)`, in IEEE doubles: for a 2:1 image
# 1024 / 98 * 49 = 511.99999999999994, so 98x49 becomes 1024x511, not 1024x512 (the fixture has no such size).
PRE_RESIZED = {
    (98, 49): (1024, 511),
    (49, 98): (511, 1024),
    (196, 147): (1024, 767),
    (392, 343): (1024, 895),
    (392, 49): (1024, 127),
    (2000, 1000): (1024, 512),
    (1088, 672): (1024, 632),
}


@pytest.mark.parametrize("size", PRE_RESIZED, ids=[f"{w}x{h}" for w, h in PRE_RESIZED])
def test_pre_resize_truncates_as_the_reference_computes_it(size: tuple[int, int]):
    width, height = size
    assert PRE.get_slice_layout(height, width).image_size == PRE_RESIZED[size][::-1]


def _pre_resized(width: int, height: int, max_size: int = 1024) -> tuple[int, int]:
    """REFERENCE.md's long-side resize, with a zero side kept at 1 pixel."""
    if width > height:
        return max_size, max(int((max_size / width) * height), 1)
    return max(int((max_size / height) * width), 1), max_size


def _ideal_sides(width: float, height: float, scale: int) -> tuple[float, float, float]:
    """Exact aspect-preserving (h*, w*) of area scale**2 for a width x height region, and its ratio r = w / h."""
    ratio = width / height
    return scale / math.sqrt(ratio), scale * math.sqrt(ratio), ratio


def _check_crop_size(size: tuple[int, int], width: float, height: float, scale: int, patch: int) -> None:
    """The bound `best_resize` guarantees: h = floor_P(int(h*)), w = floor_P(int(int(h*) * r)), each at least P.

    So h* - P < h <= max(h*, P) and w* - r - P < w <= max(w*, P) (the width also loses up to r, as the truncated
    height is multiplied by r): the area is at most scale**2 unless a side was clamped up to P, and close to it for
    moderate aspect ratios, e.g. > (scale - P) * (scale - 1 - P) for a square region.
    """
    ideal_h, ideal_w, ratio = _ideal_sides(width, height, scale)
    h, w = size
    eps = 1e-6 * (ideal_h + ideal_w)
    assert ideal_h - patch < h <= max(ideal_h, patch) + eps, (size, ideal_h)
    assert ideal_w - ratio - patch < w <= max(ideal_w, patch) + eps, (size, ideal_w, ratio)
    if min(ideal_h, ideal_w) >= patch:
        assert h * w <= scale * scale


@settings(max_examples=1000, deadline=None, database=None)
@given(
    width=st.one_of(st.integers(1, 3000), st.integers(1, 60000)),
    height=st.one_of(st.integers(1, 3000), st.integers(1, 60000)),
    max_slice_nums=st.integers(1, 12),
    geometry=st.sampled_from([(336, 14), (224, 16), (448, 14)]),
    max_image_size=st.sampled_from([NO_PRE_RESIZE, 1024, 700]),
)
def test_layout_properties(width, height, max_slice_nums, geometry, max_image_size):
    scale, patch = geometry
    processor = LlavaUhdImageProcessor(scale_resolution=scale, patch_size=patch, max_image_size=max_image_size)
    layout = processor.get_slice_layout(height, width, max_slice_nums)
    check_valid(layout, max_slice_nums, patch)

    image_w, image_h = (width, height) if not max_image_size else _pre_resized(width, height, max_image_size)
    assert layout.image_size == (image_h, image_w)
    multiple = min(math.ceil(image_w * image_h / scale**2), max_slice_nums)
    assert (layout.grid is None) == (multiple <= 1)
    _check_crop_size(layout.overview_size, image_w, image_h, scale, patch)

    tokens = SCHEMA.schema_ids(*(layout.grid or (0, 0)))
    assert len(tokens) == layout.num_crops * SCHEMA.num_queries + layout.num_slices
    if layout.grid is None:
        return
    rows, cols = layout.grid
    # Grid: the count is one of multiple-1..multiple+1, and no candidate grid fits the aspect ratio better.
    assert rows * cols in (multiple - 1, multiple, multiple + 1)
    error = lambda c, r: abs(math.log(image_w / image_h) - math.log(c / r))  # noqa: E731
    candidates = [
        (c, n // c) for n in (multiple - 1, multiple, multiple + 1) if 2 <= n <= max_slice_nums
        for c in range(1, n + 1) if n % c == 0
    ]
    assert (cols, rows) == min(candidates, key=lambda grid: error(*grid))  # ties: the first in the reference's order
    assert (cols - rows) * (image_w - image_h) >= 0  # a wide image never gets more rows than columns
    # Every slice is `best_resize` of one grid cell of the image (its sides first floored to multiples of the grid).
    cell_w = max(image_w // cols * cols, cols) / cols
    cell_h = max(image_h // rows * rows, rows) / rows
    _check_crop_size(layout.slice_size, cell_w, cell_h, scale, patch)


# --------------------------------------------------------------------------------------------- extreme sizes


@pytest.mark.parametrize("max_image_size", [NO_PRE_RESIZE, 1024])
@pytest.mark.parametrize(
    "width, height", [(1, 1), (14, 14), (13, 13), (336, 336), (20000, 20), (20, 20000), (60000, 2), (2, 60000)]
)
def test_extreme_sizes_process_end_to_end(width: int, height: int, max_image_size: int):
    processor = make_processor(num_queries=4, max_image_size=max_image_size)
    layout = processor.image_processor.get_slice_layout(height, width)
    check_valid(layout, 7)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8))
    out = processor(images=image, text="<image>", return_tensors="pt")
    grid = out["slice_grid"][0].tolist()
    assert grid == list(layout.grid or (0, 0))
    crops = [layout.slice_size] * layout.num_slices + [layout.overview_size]
    assert out["image_grid_hw"].tolist() == [[h // 14, w // 14] for h, w in crops]
    assert out["pixel_values"].shape == (int(out["image_grid_hw"].prod(-1).sum()), 3 * 14 * 14)
    assert torch.isfinite(out["pixel_values"]).all()
    ids = out["input_ids"][0].tolist()
    assert ids[1:] == spatial_schema(processor, *grid)  # after BOS
    assert ids.count(processor.image_token_id) == layout.num_crops * 4
    assert len(ids) - 1 == layout.num_crops * 4 + layout.num_slices


# ---------------------------------------------------------------------------------------------- pixel layout


def unpack_crops(pixel_values: torch.Tensor, grid_hw: torch.Tensor, patch: int = 14) -> list[torch.Tensor]:
    """Packed `[patches, 3 * patch**2]` back to one `[3, h, w]` image per crop."""
    crops, start = [], 0
    for gh, gw in grid_hw.tolist():
        block = pixel_values[start : start + gh * gw].reshape(gh, gw, 3, patch, patch)
        crops.append(block.permute(2, 0, 3, 1, 4).reshape(3, gh * patch, gw * patch))
        start += gh * gw
    assert start == len(pixel_values)
    return crops


def expected_crops(image: Image.Image, layout: SliceLayout) -> list[torch.Tensor]:
    """Independent re-derivation with PIL: resize, cut row-major, overview last, CLIP-normalise in float64."""
    height, width = layout.image_size
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    crops = []
    if layout.grid is not None:
        (rows, cols), (sh, sw) = layout.grid, layout.slice_size
        refined = image.resize((sw * cols, sh * rows), Image.Resampling.BICUBIC)
        crops += [refined.crop((c * sw, r * sh, (c + 1) * sw, (r + 1) * sh)) for r in range(rows) for c in range(cols)]
    crops.append(image.resize(layout.overview_size[::-1], Image.Resampling.BICUBIC))
    normalised = [(np.asarray(crop, dtype=np.float64) / 255 - CLIP_MEAN) / CLIP_STD for crop in crops]
    return [torch.from_numpy(array.transpose(2, 0, 1).astype(np.float32)) for array in normalised]


CASES = [  # (image, max_image_size, expected layout): layouts from REFERENCE.md and the reference fixtures
    (lambda: photo("astronaut", (1088, 672)), NO_PRE_RESIZE, SliceLayout((672, 1088), (252, 420), (2, 3), (322, 336))),
    (lambda: photo("coffee"), 1024, SliceLayout((682, 1024), (266, 406), (2, 3), (336, 336))),
    (lambda: photo("chelsea", (300, 200)), NO_PRE_RESIZE, SliceLayout((200, 300), (266, 406), None, None)),
    (lambda: gradient(200, 700), NO_PRE_RESIZE, SliceLayout((700, 200), (616, 168), (3, 1), (350, 308))),
]


def test_pixel_values_round_trip_to_pil_crops():
    images = [make() for make, _, _ in CASES]
    for (_, max_image_size, layout), image in zip(CASES, images):
        processor = LlavaUhdImageProcessor(max_image_size=max_image_size)
        assert processor.get_slice_layout(image.height, image.width) == layout
        out = processor(image)
        assert out["slice_grid"].tolist() == [list(layout.grid or (0, 0))]
        crops = unpack_crops(out["pixel_values"], out["image_grid_hw"])
        expected = expected_crops(image, layout)
        assert [tuple(c.shape) for c in crops] == [tuple(e.shape) for e in expected]
        for crop, reference in zip(crops, expected):
            torch.testing.assert_close(crop, reference, atol=1e-6, rtol=0)  # a few float32 ulps of |x| <= 2.2

    # A batch is the concatenation of the single images, in order.
    processor = LlavaUhdImageProcessor(max_image_size=NO_PRE_RESIZE)
    batch = processor(images[::-1])
    singles = [processor(image) for image in images[::-1]]
    for key in ("pixel_values", "image_grid_hw", "slice_grid"):
        assert torch.equal(batch[key], torch.cat([single[key] for single in singles]))


# ---------------------------------------------------------------------------------------------- input kinds

BASE = np.asarray(gradient(45, 31))  # not square, so HWC / CHW mix-ups change the result
RGB = Image.fromarray(BASE)
GRAY = RGB.convert("L")
WIDE = (np.arange(31 * 45) * 47 % 65536).astype(np.uint16).reshape(31, 45)  # a 16-bit grey ramp
WIDE_AS_RGB = Image.fromarray(np.rint(WIDE / 257).astype(np.uint8)).convert("RGB")  # scaled, not clipped, to 8 bits


def _saved(tmp_path: Path, image: Image.Image, name: str) -> Path:
    image.save(tmp_path / name)
    return tmp_path / name


INPUT_KINDS = {  # name: (make the input, make the equivalent RGB PIL image)
    "pil_rgb": (lambda p: RGB, lambda: RGB),
    "numpy_hwc_uint8": (lambda p: BASE, lambda: RGB),
    "numpy_chw_uint8": (lambda p: BASE.transpose(2, 0, 1), lambda: RGB),
    "numpy_hwc_float64": (lambda p: np.clip(BASE - 0.4, 0, None) / 255.0, lambda: RGB),  # rounded to nearest
    "numpy_chw_float32": (lambda p: (BASE / 255.0).astype(np.float32).transpose(2, 0, 1), lambda: RGB),
    "numpy_uint16": (lambda p: BASE.astype(np.uint16) * 257, lambda: RGB),
    "numpy_rgba": (lambda p: np.dstack([BASE, np.full(BASE.shape[:2], 7, np.uint8)]), lambda: RGB),
    "numpy_gray_2d": (lambda p: np.asarray(GRAY), lambda: GRAY.convert("RGB")),
    "numpy_gray_hw1": (lambda p: np.asarray(GRAY)[..., None], lambda: GRAY.convert("RGB")),
    "numpy_gray_1hw": (lambda p: np.asarray(GRAY)[None], lambda: GRAY.convert("RGB")),
    "numpy_bool": (lambda p: np.asarray(GRAY) > 128, lambda: GRAY.point(lambda v: 255 * (v > 128)).convert("RGB")),
    "numpy_uint16_gray": (lambda p: WIDE, lambda: WIDE_AS_RGB),
    "torch_hwc_uint8": (lambda p: torch.from_numpy(BASE.copy()), lambda: RGB),
    "torch_chw_float": (lambda p: torch.from_numpy(BASE.copy()).permute(2, 0, 1).float() / 255, lambda: RGB),
    "path_str": (lambda p: str(_saved(p, RGB, "a.png")), lambda: RGB),
    "pathlike": (lambda p: _saved(p, RGB, "a.png"), lambda: RGB),
    "mode_L": (lambda p: GRAY, lambda: GRAY.convert("RGB")),
    "mode_RGBA": (lambda p: RGB.convert("RGBA"), lambda: RGB),
    "mode_P": (lambda p: RGB.quantize(64), lambda: RGB.quantize(64).convert("RGB")),
    "mode_CMYK": (lambda p: RGB.convert("CMYK"), lambda: RGB.convert("CMYK").convert("RGB")),
    "mode_I;16": (lambda p: Image.fromarray(WIDE), lambda: WIDE_AS_RGB),
    "mode_F": (lambda p: Image.fromarray((np.asarray(GRAY) / 255).astype(np.float32)), lambda: GRAY.convert("RGB")),
    "file_I;16_png": (lambda p: _saved(p, Image.fromarray(WIDE), "wide.png"), lambda: WIDE_AS_RGB),
    "file_P_gif": (lambda p: _saved(p, RGB.quantize(64), "a.gif"), lambda: RGB.quantize(64).convert("RGB")),
}


@pytest.mark.parametrize("kind", INPUT_KINDS)
def test_input_kinds_match_their_rgb_image(kind: str, tmp_path: Path):
    make_input, make_reference = INPUT_KINDS[kind]
    out, reference = RAW(make_input(tmp_path)), RAW(make_reference())
    assert out["image_grid_hw"].tolist() == reference["image_grid_hw"].tolist() == [[19, 28]]
    assert torch.equal(out["pixel_values"], reference["pixel_values"]), kind


def test_bfloat16_tensor_is_read_as_its_float32_values():
    tensor = (torch.from_numpy(BASE.copy()).permute(2, 0, 1) > 100).to(torch.bfloat16)  # 0/1: exact in bfloat16
    assert torch.equal(RAW(tensor)["pixel_values"], RAW(tensor.float())["pixel_values"])


def test_lists_overrides_and_options():
    a, b, c = gradient(500, 400, seed=1), gradient(90, 60, seed=2), gradient(1200, 300, seed=3)
    flat, nested = PRE([a, b, c]), PRE([[a], [b, c]])
    assert all(torch.equal(flat[key], nested[key]) for key in flat)
    assert flat["slice_grid"].shape == (3, 2)
    assert torch.equal(PRE((a, b))["pixel_values"], PRE([a, b])["pixel_values"])

    # `max_slice_nums` per call is a budget for that call only.
    assert PRE(a, max_slice_nums=1)["slice_grid"].tolist() == [[0, 0]]
    assert PRE(a, max_slice_nums=2)["slice_grid"].tolist() == [[1, 2]]
    assert PRE(a)["slice_grid"].tolist() == [[2, 3]] and PRE.max_slice_nums == 7
    assert torch.equal(
        PRE(a, max_slice_nums=3)["pixel_values"], LlavaUhdImageProcessor(max_slice_nums=3)(a)["pixel_values"]
    )
    # No pre-resize: the image is sliced at its own size (500x400: 2 slices instead of 6).
    assert RAW(a)["slice_grid"].tolist() == [[1, 2]]
    assert RAW(a)["image_grid_hw"].tolist() == [[30, 18], [30, 18], [21, 26]]

    assert RAW([])["pixel_values"].shape == (0, 588) and RAW([])["slice_grid"].shape == (0, 2)
    assert RAW(a, return_tensors=None)["pixel_values"].dtype == torch.float32
    with pytest.raises(ValueError, match="return_tensors"):
        RAW(a, return_tensors="np")
    # transformers' image keywords that slicing decides itself are refused by name; unknown ones too.
    with pytest.raises(ValueError, match=r"does not take \['do_resize', 'size'\]: slicing decides"):
        RAW(a, do_resize=False, size={"height": 336, "width": 336})
    with pytest.raises(TypeError, match=r"Unexpected arguments for LlavaUhdImageProcessor: \['max_slices'\]"):
        RAW(a, max_slices=2)
    with pytest.raises(ValueError, match="`max_slice_nums` must be a positive integer, got 0"):
        RAW(a, max_slice_nums=0)


def test_input_data_format_says_where_the_channels_are():
    """An array whose layout cannot be told from its shape is read as the caller says (inferred: channels last)."""
    array = np.random.default_rng(0).integers(0, 256, (3, 40, 4), dtype=np.uint8)  # 3 channels of 40x4, or 3x40 RGBA
    first = RAW(array, input_data_format="channels_first")
    expected = RAW(np.ascontiguousarray(array.transpose(1, 2, 0)))
    assert torch.equal(first["pixel_values"], expected["pixel_values"])
    assert not torch.equal(RAW(array)["pixel_values"], first["pixel_values"])
    with pytest.raises(ValueError, match="`input_data_format` must be 'channels_first' or 'channels_last'"):
        RAW(array, input_data_format="chw")


def test_normalisation_is_the_references_arithmetic_bit_for_bit():
    """Every 8-bit value normalised exactly as the reference's `CLIPImageProcessor` (transformers 4.37) computes it:
    `uint8 * (1 / 255)` in float64, cast to float32, then `(x - mean) / std` in float32 with float32 mean and std.
    A 336x336 image is one unsliced crop that no resize touches, so its pixels reach the table unchanged."""
    values = np.arange(336 * 336) % 256
    channels = np.stack([values, values[::-1], (values * 7) % 256], -1).astype(np.uint8)
    image = Image.fromarray(channels.reshape(336, 336, 3))
    pixels = RAW(image)["pixel_values"].view(24, 24, 3, 14, 14).permute(2, 0, 3, 1, 4).reshape(3, 336, 336).numpy()
    rescaled = (np.asarray(image) * (1 / 255)).astype(np.float32)
    expected = (rescaled - CLIP_MEAN.astype(np.float32)) / CLIP_STD.astype(np.float32)
    assert expected.dtype == np.float32
    assert np.array_equal(pixels, expected.transpose(2, 0, 1))

    red = RAW(Image.new("RGB", (336, 336), (48, 48, 48)))["pixel_values"].view(576, 3, 196)[:, 0]
    assert torch.equal(red, torch.full_like(red, -1.0915381))  # float32 arithmetic on 48 / 255 gives -1.091538


def test_normalisation_keywords_are_honoured():
    """`do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std` per call, as transformers' image
    processors take them; the values are checked against a computation from the raw pixels."""
    image = gradient(336, 336)
    raw = torch.tensor(np.asarray(image), dtype=torch.float32)  # 336x336 is one unsliced 24x24-patch crop
    patches = raw.view(24, 14, 24, 14, 3).permute(0, 2, 4, 1, 3).reshape(576, 3 * 14 * 14)
    torch.testing.assert_close(RAW(image, do_rescale=False, do_normalize=False)["pixel_values"], patches)
    torch.testing.assert_close(RAW(image, do_normalize=False)["pixel_values"], patches / 255, atol=1e-6, rtol=0)
    scaled = RAW(image, rescale_factor=1 / 100, image_mean=0.5, image_std=[0.5, 0.25, 2.0])["pixel_values"]
    channel_std = torch.tensor([0.5, 0.25, 2.0]).repeat_interleave(14 * 14)
    torch.testing.assert_close(scaled, (patches / 100 - 0.5) / channel_std, atol=1e-5, rtol=0)
    assert torch.equal(RAW(image, do_rescale=None)["pixel_values"], RAW(image)["pixel_values"])  # None: the default
    with pytest.raises(ValueError, match="one value or three"):
        RAW(image, image_mean=[0.5, 0.5])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_slice_nums": 0}, "`max_slice_nums` must be a positive integer, got 0"),
        ({"max_slice_nums": True}, "`max_slice_nums` must be a positive integer, got True"),
        ({"patch_size": 14.0}, "`patch_size` must be a positive integer, got 14.0"),
        ({"scale_resolution": -336}, "`scale_resolution` must be a positive integer"),
        ({"max_image_size": -1}, "`max_image_size` must be a positive integer, or 0 for no pre-resize, got -1"),
        ({"max_image_size": False}, "`max_image_size` must be a positive integer, or 0 .*, got False"),
        ({"max_image_size": 1024.0}, "`max_image_size` must be a positive integer, or 0 .*, got 1024.0"),
    ],
)
def test_bad_settings(kwargs: dict, message: str):
    with pytest.raises(ValueError, match=message):
        LlavaUhdImageProcessor(**kwargs)


def test_bad_layout_arguments():
    with pytest.raises(ValueError, match="`height` must be a positive integer, got 0"):
        RAW.get_slice_layout(0, 10)
    with pytest.raises(ValueError, match="`width` must be a positive integer, got 2.5"):
        RAW.get_slice_layout(10, 2.5)


# --------------------------------------------------------------------------------------------------- errors


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def _truncated_png(tmp_path: Path) -> Path:
    gradient(64, 64).save(tmp_path / "full.png")
    return _write(tmp_path, "cut.png", (tmp_path / "full.png").read_bytes()[:400])


BAD_INPUTS = {  # name: (make the input, exception, message after "images[1]")
    "corrupt_file": (lambda p: _write(p, "a.png", b"junk"), ValueError, r": '.*a.png' is not a readable image"),
    "empty_file": (lambda p: _write(p, "b.jpg", b""), ValueError, r": '.*b.jpg' is not a readable image"),
    "truncated_file": (_truncated_png, ValueError, r" could not be decoded \(corrupt or truncated image data\)"),
    "missing_file": (lambda p: p / "c.png", FileNotFoundError, r": no image file at '.*c.png'"),
    "directory": (lambda p: p, ValueError, r": '.*' is not a readable image"),
    "zero_size_array": (lambda p: np.zeros((0, 5, 3), np.uint8), ValueError, r" is empty: shape \(0, 5, 3\)"),
    "zero_size_image": (lambda p: Image.new("RGB", (0, 3)), ValueError, r" is empty: 0x3 pixels"),
    "4d_array": (lambda p: np.zeros((1, 5, 5, 3), np.uint8), ValueError, r" must be an array of shape .*5, 3\)"),
    "1d_array": (lambda p: np.zeros(5, np.uint8), ValueError, r" must be an array of shape .*got \(5,\)"),
    "two_channels": (lambda p: np.zeros((5, 5, 2), np.uint8), ValueError, r" must be an array of shape .*\(5, 5, 2\)"),
    "int64_array": (lambda p: np.zeros((5, 5, 3), np.int64), ValueError, r" has dtype int64; expected uint8"),
    "float_255": (lambda p: np.full((5, 5, 3), 255.0), ValueError, r" is a float array; expected .*1\], got .*255"),
    "float_nan": (lambda p: np.full((5, 5), np.nan), ValueError, r" is a float array; expected values in \[0, 1\]"),
    "mode_F_255": (
        lambda p: Image.fromarray(np.full((5, 5), 255.0, np.float32)),
        ValueError,
        r" \(PIL mode 'F'\) is a float array; expected values in \[0, 1\], got range \[255.0, 255.0\]",
    ),
    "int": (lambda p: 7, TypeError, r" must be a PIL image, a numpy array, a torch tensor or a path, got int"),
    "bytes": (lambda p: b"\x89PNG", TypeError, r" must be a PIL image, .*got bytes"),
    "none": (lambda p: None, TypeError, r" must be a PIL image, .*got NoneType"),
}


@pytest.mark.filterwarnings("ignore:All-NaN slice")
@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_inputs_name_the_image(kind: str, tmp_path: Path):
    make_input, error, message = BAD_INPUTS[kind]
    good = gradient(30, 20)
    images = [good, make_input(tmp_path)]
    with pytest.raises(error, match=r"^images\[1\]" + message):
        RAW(images)
    with pytest.raises(error, match=r"^images\[3\]"):
        RAW([[good], [good, good, images[1]]])  # the index counts through nested lists


def test_a_bad_image_leaves_nothing_half_done(tmp_path: Path):
    good, palette = gradient(500, 300), gradient(40, 30).quantize(16)
    settings_before = PRE.to_dict()
    before = PRE([good, palette])
    corrupt = _write(tmp_path, "bad.png", b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(ValueError, match=r"^images\[2\]"):
        PRE([good, palette, corrupt])
    # Inputs and settings untouched, and the next call gives exactly what it gave before.
    assert palette.mode == "P" and good.size == (500, 300)
    assert PRE.to_dict() == settings_before
    after = PRE([good, palette])
    assert all(torch.equal(before[key], after[key]) for key in before)


def test_decompression_bombs_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Files are opened with PIL's pixel limit: above twice `Image.MAX_IMAGE_PIXELS` a clear error, not a hang."""
    path = _saved(tmp_path, Image.new("L", (100, 100)), "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4_000)
    with pytest.raises(ValueError, match=r"^images\[0\]: '.*bomb.png' is not a readable image: .*decompression bomb"):
        RAW(path)
    with pytest.warns(Image.DecompressionBombWarning):
        RAW(_saved(tmp_path, Image.new("L", (80, 80)), "big.png"))  # between 1x and 2x the limit: a warning
    # PIL checks the limit when it opens a file; an image already in memory is processed.
    assert PRE(Image.new("L", (100, 100)))["slice_grid"].tolist() == [[2, 3]]


# ------------------------------------------------------------------------------------------------ EXIF orientation


@pytest.fixture()
def served(tmp_path: Path):
    """A loopback HTTP server over `tmp_path`: yields the base URL."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_exif_orientation_is_applied_the_same_way_on_every_route(tmp_path: Path, served: str):
    """A phone photo stored 1200x400 with orientation 6 (rotate 90 degrees) is a 400x1200 portrait: as a path, a PIL
    image, a URL given to the processor and a URL in a chat message (loaded by transformers), it is sliced upright."""
    stored = gradient(1200, 400)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    url = f"{served}/phone.jpg"
    processor = make_processor(num_queries=1)
    upright = processor.image_processor.get_slice_layout(1200, 400).grid  # (rows, cols) of the portrait
    stored_grid = processor.image_processor.get_slice_layout(400, 1200).grid
    assert upright != stored_grid

    routes = {
        "path": str(tmp_path / "phone.jpg"),
        "pil": Image.open(tmp_path / "phone.jpg"),
        "url": url,
    }
    pixels = {}
    for route, image in routes.items():
        out = processor.image_processor(image)
        assert tuple(out["slice_grid"][0].tolist()) == upright, route
        pixels[route] = out["pixel_values"]
    assert torch.equal(pixels["path"], pixels["pil"]) and torch.equal(pixels["path"], pixels["url"])
    messages = [{"role": "user", "content": [{"type": "image", "url": url}, {"type": "text", "text": "Hi"}]}]
    chat = processor.apply_chat_template(messages, tokenize=True, return_dict=True)
    assert tuple(chat["slice_grid"][0].tolist()) == upright
    assert torch.equal(chat["pixel_values"], pixels["path"])

    # As stored (the reference's `Image.open`), for every route the processor loads itself.
    as_stored = LlavaUhdImageProcessor(apply_exif_orientation=False)
    for route, image in routes.items():
        image = Image.open(tmp_path / "phone.jpg") if route == "pil" else image
        assert tuple(as_stored(image)["slice_grid"][0].tolist()) == stored_grid, route


def test_unreachable_url_is_named(served: str):
    with pytest.raises(ValueError, match=r"images\[0\]: 'http://127.0.0.1:\d+/missing.png' could not be downloaded"):
        PRE(f"{served}/missing.png")


# ------------------------------------------------------------------------------------------------ save / load


def test_save_and_load_keep_every_setting(tmp_path: Path):
    processor = LlavaUhdImageProcessor(
        max_slice_nums=4,
        scale_resolution=224,
        patch_size=16,
        max_image_size=NO_PRE_RESIZE,
        rescale_factor=1 / 256,
        image_mean=(0.5, 0.25, 0.125),
        image_std=(0.2, 0.3, 0.4),
        apply_exif_orientation=False,
    )
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["max_image_size"] == 0 and saved["max_slice_nums"] == 4 and saved["patch_size"] == 16
    reloaded = LlavaUhdImageProcessor.from_pretrained(tmp_path)
    names = ("max_slice_nums", "scale_resolution", "patch_size", "max_image_size", "rescale_factor")
    for name in (*names, "apply_exif_orientation"):
        assert getattr(reloaded, name) == getattr(processor, name), name
    assert reloaded.image_mean == processor.image_mean and reloaded.image_std == processor.image_std
    image = gradient(700, 300)
    out, again = processor(image), reloaded(image)
    assert out["pixel_values"].shape[1] == 3 * 16 * 16 and out["slice_grid"].prod() <= 4
    assert all(torch.equal(out[key], again[key]) for key in out)


def test_no_pre_resize_is_a_value_of_every_call():
    """`max_image_size=0` turns the pre-resize off per call, as at construction (`None` per call: the processor's own
    setting), in `get_slice_layout`, the image processor and the processor alike: no second processor is needed."""
    image = photo("astronaut", (1088, 672))
    assert PRE.get_slice_layout(672, 1088) != RAW.get_slice_layout(672, 1088)
    assert PRE.get_slice_layout(672, 1088, max_image_size=NO_PRE_RESIZE) == RAW.get_slice_layout(672, 1088)
    assert PRE.get_slice_layout(672, 1088, max_image_size=None) == PRE.get_slice_layout(672, 1088)
    assert RAW.get_slice_layout(672, 1088, max_image_size=1024) == PRE.get_slice_layout(672, 1088)
    off, raw = PRE(image, max_image_size=NO_PRE_RESIZE), RAW(image)
    assert all(torch.equal(off[key], raw[key]) for key in raw)
    pre_resizing, not_resizing = make_processor(num_queries=3), make_processor(num_queries=3, max_image_size=0)
    ours = pre_resizing(images=image, text="<image>", max_image_size=0, return_tensors="pt")
    expected = not_resizing(images=image, text="<image>", return_tensors="pt")
    assert all(torch.equal(ours[key], expected[key]) for key in expected)
    tokens = pre_resizing._get_num_multimodal_tokens([[672, 1088]], max_image_size=0)["num_image_tokens"]
    assert tokens == not_resizing._get_num_multimodal_tokens([[672, 1088]])["num_image_tokens"]
    with pytest.raises(ValueError, match="`max_image_size` must be a positive integer, or 0 for no pre-resize"):
        PRE(image, max_image_size=-5)


def test_none_at_construction_is_the_deprecated_spelling_of_no_pre_resize(tmp_path: Path):
    """`max_image_size=None` at construction still means no pre-resize, with a FutureWarning, and so does a processor
    saved with `"max_image_size": null`; saved again, it is written as 0."""
    image = gradient(700, 300)
    with pytest.warns(FutureWarning, match=r"`max_image_size=None` for no pre-resize is deprecated"):
        old = LlavaUhdImageProcessor(max_image_size=None)
    assert old.max_image_size == NO_PRE_RESIZE
    assert all(torch.equal(old(image)[key], RAW(image)[key]) for key in RAW(image))
    processor = make_processor(num_queries=3, max_image_size=NO_PRE_RESIZE)
    processor.save_pretrained(tmp_path / "saved")
    files = [path for path in (tmp_path / "saved").glob("*.json") if '"max_image_size": 0' in path.read_text()]
    assert files
    for path in files:  # as written before 0 meant "no pre-resize"
        path.write_text(path.read_text().replace('"max_image_size": 0', '"max_image_size": null'))
    with pytest.warns(FutureWarning, match="max_image_size"):
        loaded = type(processor).from_pretrained(tmp_path / "saved")
    assert loaded.image_processor.max_image_size == NO_PRE_RESIZE
    ours = loaded(images=image, text="<image>", return_tensors="pt")
    expected = processor(images=image, text="<image>", return_tensors="pt")
    assert all(torch.equal(ours[key], expected[key]) for key in expected)
    loaded.save_pretrained(tmp_path / "again")
    assert any('"max_image_size": 0' in path.read_text() for path in (tmp_path / "again").glob("*.json"))
