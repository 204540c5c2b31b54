"""Resampler parts against data recorded from torchvision and from the reference implementation (tests/fixtures)."""

import itertools
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_config

from modeling_llava_uhd.modeling_llava_uhd import (
    LlavaUhdResampler,
    best_pooling_size,
    resize_position_table,
    roi_align_matrix,
    sincos_position_table,
    window_boxes,
)

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def roi():
    return load_file(FIXTURES / "roi_align_reference.safetensors")


def _roi_align(features: torch.Tensor, boxes: torch.Tensor, pooled: tuple[int, int]) -> torch.Tensor:
    """Our RoIAlign matrix applied like `torchvision.ops.roi_align(features, boxes, pooled)`."""
    _, channels, height, width = features.shape
    out = torch.empty(len(boxes), channels, *pooled)
    for image in boxes[:, 0].unique():
        rows = boxes[:, 0] == image
        matrix = roi_align_matrix(boxes[rows, 1:], height, width, *pooled)  # [boxes * bins, height * width]
        pooled_features = matrix @ features[int(image)].reshape(channels, height * width).T
        out[rows] = pooled_features.reshape(-1, *pooled, channels).permute(0, 3, 1, 2)
    return out


def test_window_boxes_match_recorded(roi):
    for key in (k for k in roi if k.startswith("boxes.")):
        height, width = map(int, key.split(".")[1].split("x"))
        boxes = roi[key]
        assert torch.equal(boxes[:144, 1:], window_boxes(height, width, 144)), key


def test_roi_align_matrix_matches_torchvision(roi):
    outputs = [k for k in roi if k.startswith("output.")]
    assert len(outputs) >= 20
    for key in outputs:
        _, shape, pooled = key.split(".")
        pooled = tuple(map(int, pooled.split("x")))
        got = _roi_align(roi[f"input.{shape}"], roi[f"boxes.{shape}"], pooled)
        torch.testing.assert_close(got, roi[key], atol=2e-6, rtol=1e-5, msg=key)


def test_roi_align_matrix_random_boxes(roi):
    outputs = [k for k in roi if k.startswith("rand.output.")]
    assert outputs
    for key in outputs:
        pooled = tuple(map(int, key.rsplit(".", 1)[1].split("x")))
        got = _roi_align(roi["rand.input"], roi["rand.boxes"], pooled)
        torch.testing.assert_close(got, roi[key], atol=2e-6, rtol=1e-5, msg=key)


def _bilinear(features: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """torchvision's RoIAlign bilinear sample of `features` `[C, H, W]` at (y, x), border rules included."""
    _, height, width = features.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(len(features), dtype=features.dtype)
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    y_high, x_high = min(y_low + 1, height - 1), min(x_low + 1, width - 1)
    if y_low >= height - 1:
        y_low, y = height - 1, float(height - 1)
    if x_low >= width - 1:
        x_low, x = width - 1, float(width - 1)
    ly, lx = y - y_low, x - x_low
    return (
        (1 - ly) * (1 - lx) * features[:, y_low, x_low]
        + (1 - ly) * lx * features[:, y_low, x_high]
        + ly * (1 - lx) * features[:, y_high, x_low]
        + ly * lx * features[:, y_high, x_high]
    )


def naive_roi_align(features: torch.Tensor, box: torch.Tensor, pooled: tuple[int, int]) -> torch.Tensor:
    """`torchvision.ops.roi_align(..., spatial_scale=1, sampling_ratio=-1, aligned=False)` of one box (x1, y1, x2, y2)
    over `features` `[C, H, W]`, sample by sample in float64: a second computation that shares nothing with the
    package's RoIAlign matrices. Returns `[C, pooled_h, pooled_w]`."""
    features = features.double()
    x1, y1 = box[:2].tolist()
    # Box extents in float32 as torchvision computes them: they decide the number of samples.
    box_w, box_h = (max(extent, 1.0) for extent in (box[2:] - box[:2]).float().tolist())
    (pooled_h, pooled_w), out = pooled, torch.zeros(len(features), *pooled, dtype=torch.float64)
    samples_h, samples_w = math.ceil(box_h / pooled_h), math.ceil(box_w / pooled_w)
    for row, col in itertools.product(range(pooled_h), range(pooled_w)):
        for sy, sx in itertools.product(range(samples_h), range(samples_w)):
            y = y1 + row * box_h / pooled_h + (sy + 0.5) * box_h / pooled_h / samples_h
            x = x1 + col * box_w / pooled_w + (sx + 0.5) * box_w / pooled_w / samples_w
            out[:, row, col] += _bilinear(features, y, x)
    return out / max(samples_h * samples_w, 1)


def test_naive_roi_align_is_torchvisions(roi):
    """The test's own RoIAlign against torchvision's recorded outputs, edge boxes included (outside the map, below a
    pixel, empty, inverted)."""
    for pooled in ((3, 3), (2, 4), (1, 1), (5, 7)):
        expected = roi[f"rand.output.{pooled[0]}x{pooled[1]}"]
        for k, box in enumerate(roi["rand.boxes"]):
            got = naive_roi_align(roi["rand.input"][int(box[0])], box[1:], pooled)
            torch.testing.assert_close(got.float(), expected[k], atol=2e-6, rtol=1e-5)


# The RoIAlign grid (rows, cols) the reference chooses for each recorded map (fixtures/NOTES.md).
POOLING = {(24, 24): (3, 3), (22, 26): (3, 4), (30, 18): (3, 2), (3, 151): (2, 4), (151, 3): (4, 2), (7, 9): (3, 4)}


def _pooling_resampler() -> LlavaUhdResampler:
    return LlavaUhdResampler(make_config(num_queries=144))


@pytest.mark.parametrize("height, width", list(POOLING))
def test_window_pooling_is_torchvisions_roi_align_of_the_reference_windows(roi, height, width):
    """The resampler's separable pooling of all 144 windows equals torchvision's `roi_align` of the reference's boxes,
    as recorded: `[2, 5, H, W]` maps, outputs `[2 * 144, 5, h, w]`."""
    pooled = POOLING[(height, width)]
    assert best_pooling_size(height, width) == pooled
    features = roi[f"input.{height}x{width}"]
    x = features.permute(0, 2, 3, 1).reshape(2, height * width, 5).contiguous()  # [crops, positions, channels]
    got = _pooling_resampler()._pool_windows(x, height, width)  # [crops, 144, h * w, channels]
    expected = roi[f"output.{height}x{width}.{pooled[0]}x{pooled[1]}"].reshape(2, 144, 5, -1).transpose(-1, -2)
    torch.testing.assert_close(got, expected, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("height, width", [(22, 26), (7, 9), (3, 151)])
def test_bfloat16_window_pooling_uses_boxes_rounded_to_bfloat16(roi, height, width):
    """As the reference, which casts its float32 boxes to the features' dtype before `roi_align`: in a bfloat16 model
    the windows are the recorded boxes rounded to bfloat16 (box edges move by up to 0.01, 0.04 and 0.42 pixel here)."""
    pooled = POOLING[(height, width)]
    boxes = roi[f"boxes.{height}x{width}"][:144, 1:]
    rounded = boxes.to(torch.bfloat16).float()
    assert (rounded - boxes).abs().max() > 1e-3
    features = roi[f"input.{height}x{width}"].to(torch.bfloat16).float()
    x = features.permute(0, 2, 3, 1).reshape(2, height * width, 5).to(torch.bfloat16).contiguous()
    got = _pooling_resampler()._pool_windows(x, height, width)
    for crop in range(2):
        expected = torch.stack([naive_roi_align(features[crop], box, pooled) for box in rounded])
        torch.testing.assert_close(got[crop], expected.flatten(2).transpose(1, 2).float(), atol=1e-5, rtol=1e-5)


def test_pooling_size_follows_aspect_ratio():
    assert best_pooling_size(24, 24) == (3, 3)
    assert best_pooling_size(12, 24) == (2, 4)  # wide map: 4 columns, 2 rows
    assert best_pooling_size(24, 12) == (4, 2)
    assert best_pooling_size(3, 151) == (2, 4)


def test_sincos_table_layout():
    table = sincos_position_table(16, 12)
    assert table.shape == (144, 16)
    # First half encodes the column, second half the row; index 0 of each quarter is sin/cos at frequency 1, index 1 at 1 / 10000 ** (1 / 4) for 16 channels.
    col, row = 5, 7
    entry = table[row * 12 + col]
    assert math.isclose(entry[0].item(), math.sin(col), abs_tol=1e-6)
    assert math.isclose(entry[4].item(), math.cos(col), abs_tol=1e-6)
    assert math.isclose(entry[8].item(), math.sin(row), abs_tol=1e-6)
    assert math.isclose(entry[12].item(), math.cos(row), abs_tol=1e-6)
    assert math.isclose(entry[1].item(), math.sin(col / 10000 ** (1 / 4)), abs_tol=1e-6)
    torch.testing.assert_close(resize_position_table(table, 12, 12), table, atol=1e-6, rtol=0)


@pytest.mark.parametrize("height, width", [(24, 24), (19, 29), (3, 40), (1, 1)])
def test_a_bfloat16_position_table_is_resized_in_float32(height, width):
    """The table is resized in float32 and rounded to bfloat16 once: a bfloat16 interpolation would move about a fifth
    of the entries by up to a bfloat16 step."""
    torch.manual_seed(0)
    table = (torch.randn(144, 64) * 3).to(torch.bfloat16)
    grid = table.float().reshape(1, 12, 12, 64).permute(0, 3, 1, 2)
    expected = torch.nn.functional.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(height * width, 64).to(torch.bfloat16)
    resized = resize_position_table(table, height, width)
    assert resized.dtype == torch.bfloat16 and torch.equal(resized, expected)


@pytest.fixture(scope="module")
def recorded():
    path = FIXTURES / "resampler_reference.safetensors"
    return load_file(path)


@pytest.mark.parametrize("variant,projector_type", [("spatial", "spatial_resampler"), ("perceiver", "resampler")])
def test_resampler_matches_reference(recorded, variant, projector_type):
    state = {k.split(".state.", 1)[1]: v for k, v in recorded.items() if k.startswith(f"{variant}.state.")}
    num_queries, embed_dim = state["query"].shape
    kv_dim = state["kv_proj.weight"].shape[1]
    config = make_config(projector_type, num_queries=num_queries, resampler_num_heads=2)
    config.text_config.hidden_size = embed_dim
    config.vision_config.hidden_size = kv_dim
    resampler = LlavaUhdResampler(config).eval()
    resampler.load_state_dict(state)
    torch.testing.assert_close(resampler.pos_embed, sincos_position_table(embed_dim, math.isqrt(num_queries)))
    inputs = [k for k in recorded if k.startswith(f"{variant}.input.")]
    assert len(inputs) >= 3
    for key in inputs:
        shape = key.rsplit(".", 1)[1]
        height, width = map(int, shape.split("x"))
        with torch.no_grad():
            got = resampler(recorded[key], height, width)
        torch.testing.assert_close(got, recorded[f"{variant}.output.{shape}"], atol=1e-5, rtol=1e-5, msg=key)
