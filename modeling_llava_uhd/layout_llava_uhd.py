"""Where LLaVA-UHD's crops and image tokens go: the layout facts that the processor, the transformers and vLLM models,
the training collator, the command line and the benchmarks share, stated once.

Orientation: every size, grid and shape is `(height, width)`, i.e. `(rows, cols)`: image and crop sizes in pixels,
each crop's patch grid (`image_grid_hw`) and each image's slice grid (`slice_grid`; `(0, 0)` for an image that is not
sliced). PIL's `(width, height)` belongs only at calls into PIL.

An image of a `rows x cols` slice grid is cut into `rows * cols + 1` crops: its slices row-major, then the overview.
Every crop becomes `num_queries` image tokens, and the image's schema in the sequence is its crops' tokens in that
order, each slice followed by a separator id (see `schema_ids`).
"""

import torch


def crops_per_image(rows: int, cols: int) -> int:
    """Crops of an image of a `rows x cols` slice grid (`0 x 0`: unsliced): its slices, then the overview."""
    return rows * cols + 1


def schema_ids(
    rows: int, cols: int, num_queries: int, image_token_id: int, slice_separator_id: int, row_separator_id: int
) -> list[int]:
    """The spatial schema of a `rows x cols` slice grid (0 x 0: unsliced): each row's slices as `num_queries` image
    tokens followed by the slice separator (the row separator after the row's last slice), then the overview."""
    crop = [image_token_id] * num_queries
    ids = []
    for _ in range(rows):
        for col in range(cols):
            ids += crop + [slice_separator_id if col < cols - 1 else row_separator_id]
    return ids + crop


def schema_token_counts(rows: int, cols: int, num_queries: int) -> tuple[int, int]:
    """(image tokens, separators) of the schema of a `rows x cols` slice grid: `num_queries` per crop, one separator
    after each slice."""
    return crops_per_image(rows, cols) * num_queries, rows * cols


def image_schema_mask(
    input_ids: torch.Tensor, image_token_id: int, slice_grid: torch.Tensor | None, num_queries: int
) -> torch.Tensor:
    """Where the images' schemas lie in `input_ids`: image tokens, and with `slice_grid` (images in order) also the
    separators between an image's crops, from its first image token to its last."""
    image = input_ids == image_token_id
    if slice_grid is None:
        return image
    mask = image.clone()
    counts = iter([crops_per_image(rows, cols) * num_queries for rows, cols in slice_grid.tolist()])
    for row, positions in enumerate(image):
        positions = positions.nonzero().flatten().tolist()
        while positions:
            count = min(next(counts), len(positions))
            mask[row, positions[0] : positions[count - 1] + 1] = True
            positions = positions[count:]
    return mask


def images_from_patches(patches: torch.Tensor, height: int, width: int, patch: int) -> torch.Tensor:
    """Same-shape crops as `LlavaUhdImageProcessor` packs them, `[crops, height * width, 3 * patch * patch]` (patches
    row-major, each channel-first), back to images `[crops, 3, height * patch, width * patch]`."""
    images = patches.view(len(patches), height, width, 3, patch, patch).permute(0, 3, 1, 4, 2, 5)
    return images.reshape(len(patches), 3, height * patch, width * patch)


def crops_by_shape(
    pixel_values: torch.Tensor, image_grid_hw: list[list[int]], patch_size: int
) -> list[tuple[tuple[int, int], list[int], torch.Tensor]]:
    """Packed patches (see `LlavaUhdImageProcessor`) as images, one batch per distinct patch grid: `(height, width)`
    in patches, the indices of its crops, and the crops `[n, 3, height * patch_size, width * patch_size]`."""
    crops = pixel_values.split([h * w for h, w in image_grid_hw])
    groups: dict[tuple[int, int], list[int]] = {}
    for index, shape in enumerate(image_grid_hw):
        groups.setdefault(tuple(shape), []).append(index)
    return [
        (
            (height, width),
            indices,
            images_from_patches(torch.stack([crops[i] for i in indices]), height, width, patch_size),
        )
        for (height, width), indices in groups.items()
    ]


def encode_by_shape(pixel_values: torch.Tensor, image_grid_hw: list[list[int]], patch_size: int, encode):
    """`encode(images, height, width, indices)` run once per distinct patch grid (see `crops_by_shape`), its outputs
    (`[n, ...]` for the `n` crops at `indices`) put back in crop order: `[crops, ...]`, or `None` without crops."""
    tokens = None
    for (height, width), indices, images in crops_by_shape(pixel_values, image_grid_hw, patch_size):
        encoded = encode(images, height, width, indices)
        if tokens is None:
            tokens = encoded.new_empty(len(image_grid_hw), *encoded.shape[1:])
        tokens[indices] = encoded
    return tokens
