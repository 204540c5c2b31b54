"""The layout module: schema ids and counts, the schema mask, crops grouped by shape, the (height, width) order."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import gradient
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from modeling_llava_uhd import LlavaUhdImageProcessor
from modeling_llava_uhd.layout_llava_uhd import (
    crops_by_shape,
    crops_per_image,
    encode_by_shape,
    image_schema_mask,
    schema_ids,
    schema_token_counts,
)

I, C, N = 7, 8, 9  # image token, slice separator, row separator


@pytest.mark.parametrize("grid", [(0, 0), (1, 2), (2, 1), (2, 3), (3, 3), (1, 7)])
@pytest.mark.parametrize("num_queries", [1, 3])
def test_counts_agree_with_the_schema(grid: tuple[int, int], num_queries: int):
    ids = schema_ids(*grid, num_queries, I, C, N)
    image_tokens, separators = schema_token_counts(*grid, num_queries)
    assert ids.count(I) == image_tokens == crops_per_image(*grid) * num_queries
    assert ids.count(C) + ids.count(N) == separators and ids.count(N) == grid[0]  # one row separator per row
    assert ids[-num_queries:] == [I] * num_queries  # the overview last, with no separator after it


def test_the_schema_mask_covers_each_schema_whole():
    schemas = [schema_ids(2, 3, 2, I, C, N), schema_ids(0, 0, 2, I, C, N), schema_ids(1, 2, 2, I, C, N)]
    text = [1, C, 2]  # separator ids in the text are text
    row0 = text + schemas[0] + text + schemas[1]
    row1 = schemas[2] + text + [0] * (len(row0) - len(schemas[2]) - len(text))
    input_ids = torch.tensor([row0, row1])
    mask = image_schema_mask(input_ids, I, torch.tensor([[2, 3], [0, 0], [1, 2]]), num_queries=2)
    expected = [
        [0] * 3 + [1] * len(schemas[0]) + [0] * 3 + [1] * len(schemas[1]),
        [1] * len(schemas[2]) + [0] * (len(row0) - len(schemas[2])),
    ]
    assert mask.int().tolist() == expected
    assert image_schema_mask(input_ids, I, None, 2).tolist() == (input_ids == I).tolist()  # without grids: tokens


def test_crops_are_encoded_once_per_shape_and_come_back_in_order():
    grids = [[2, 3], [1, 1], [2, 3], [3, 2], [1, 1]]
    patch = 2
    pixel_values = torch.cat(
        [torch.full((h * w, 3 * patch * patch), float(index)) for index, (h, w) in enumerate(grids)]
    )
    calls = []

    def encode(images: torch.Tensor, height: int, width: int, indices: list[int]) -> torch.Tensor:
        calls.append((height, width, indices))
        assert images.shape == (len(indices), 3, height * patch, width * patch)
        return images.amax(dim=(1, 2, 3))[:, None].expand(-1, 4)  # each crop's own index

    tokens = encode_by_shape(pixel_values, grids, patch, encode)
    assert tokens[:, 0].tolist() == [0, 1, 2, 3, 4] and tokens.shape == (5, 4)
    assert calls == [(2, 3, [0, 2]), (1, 1, [1, 4]), (3, 2, [3])]
    assert encode_by_shape(pixel_values[:0], [], patch, encode) is None


def test_crops_are_height_by_width_as_the_image_processor_packs_them():
    """A tall photo's overview comes back as an image `height x width` whose pixels are the normalised PIL resize."""
    processor = LlavaUhdImageProcessor(max_image_size=0, max_slice_nums=1)
    image = gradient(200, 500)  # W x H: tall
    out = processor(image)
    (height, width), indices, crops = crops_by_shape(out["pixel_values"], out["image_grid_hw"].tolist(), 14)[0]
    layout = processor.get_slice_layout(500, 200)
    assert height > width and (height * 14, width * 14) == layout.overview_size and indices == [0]
    resized = np.asarray(image.resize((width * 14, height * 14), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    expected = (resized - np.float32(OPENAI_CLIP_MEAN)) / np.float32(OPENAI_CLIP_STD)
    torch.testing.assert_close(crops[0], torch.from_numpy(expected).permute(2, 0, 1), rtol=0, atol=1e-5)
