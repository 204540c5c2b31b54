"""Resampler parts against data recorded from torchvision and from the reference implementation (tests/fixtures)."""

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
