"""Image processor for LLaVA-UHD: aspect-ratio-aware slicing into variable-sized crops plus an overview."""

import io
import math
import os
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import TensorType

from .layout_llava_uhd import crops_per_image

ImageLike = Image.Image | np.ndarray | torch.Tensor | str | os.PathLike

# PIL integer modes holding more than 8 bits per pixel: scaled to 8 bits instead of clipped by `convert("RGB")`. A
# float ("F") image is read as the float array it is (values in [0, 1]).
_WIDE_MODES = {"I;16": 257.0, "I;16L": 257.0, "I;16B": 257.0, "I;16N": 257.0, "I": 257.0}
EXIF_ORIENTATION = 0x0112
URL_TIMEOUT = 60


class LlavaUhdImageProcessorKwargs(ImagesKwargs, total=False):
    """
    max_slice_nums (`int`): most slices per image (1: the overview only).
    max_image_size (`int`): long side images are resized to before slicing; `NO_PRE_RESIZE` (0): not resized.
    apply_exif_orientation (`bool`): turn photos upright by their EXIF orientation tag first.
    `None` (for any of them) means the image processor's own setting.
    """

    max_slice_nums: int | None
    max_image_size: int | None
    apply_exif_orientation: bool | None


class LlavaUhdImageProcessorInitKwargs(LlavaUhdImageProcessorKwargs, total=False):
    """
    scale_resolution (`int`): side of the square whose area every crop approximates.
    patch_size (`int`): the vision tower's patch size; crop sides are multiples of it.
    Fixed when the processor is built (the crop geometry the model was trained on), not per call.
    """

    scale_resolution: int | None
    patch_size: int | None


# `max_image_size` that slices images at their own size (the reference's training), per call as at construction.
NO_PRE_RESIZE = 0
# The image processor's settings that a call can override, then all of them (their defaults: `LlavaUhdImageProcessor`'s
# class attributes).
CALL_SETTINGS = (
    "max_slice_nums", "max_image_size", "apply_exif_orientation", "do_rescale", "rescale_factor", "do_normalize",
    "image_mean", "image_std",
)  # fmt: skip
SETTINGS = ("scale_resolution", "patch_size", *CALL_SETTINGS)


# Keywords of transformers' `ImagesKwargs` that LLaVA-UHD's slicing decides itself (crop sizes, resampling, layout).
FIXED_BY_SLICING = (
    "do_resize", "size", "default_to_square", "crop_size", "resample", "do_pad", "pad_size", "do_center_crop",
    "data_format", "device", "disable_grouping", "image_seq_length",
)  # fmt: skip


@dataclass(frozen=True)
class SliceLayout:
    """How one image is cut into crops. All sizes are `(height, width)` in pixels.

    Attributes:
        image_size: size of the image that is sliced (after the optional long-side pre-resize).
        overview_size: size of the low-resolution overview crop.
        grid: `(rows, cols)` of slices, or `None` when the image is not sliced.
        slice_size: size of every slice, or `None` when the image is not sliced.
    """

    image_size: tuple[int, int]
    overview_size: tuple[int, int]
    grid: tuple[int, int] | None
    slice_size: tuple[int, int] | None

    @property
    def num_slices(self) -> int:
        return 0 if self.grid is None else self.grid[0] * self.grid[1]

    @property
    def num_crops(self) -> int:
        return crops_per_image(*(self.grid or (0, 0)))


def _fit_to_multiple(length: float, multiple: int) -> int:
    """Floor `length` to a multiple of `multiple`, at least `multiple` (the reference's `ensure_divide`)."""
    return max(math.floor(length / multiple) * multiple, multiple)


def _best_resize(height: float, width: float, scale: int, patch: int, upscale: bool) -> tuple[int, int]:
    """Size `(height, width)` of about `scale**2` pixels keeping the aspect ratio, in multiples of `patch`."""
    if width * height > scale * scale or upscale:
        ratio = width / height
        height = int(scale / math.sqrt(ratio))
        width = int(height * ratio)
    return _fit_to_multiple(height, patch), _fit_to_multiple(width, patch)


def _best_grid(height: int, width: int, multiple: int, max_slice_nums: int) -> tuple[int, int]:
    """`(rows, cols)` whose aspect ratio is closest to the image's, among `multiple - 1 .. multiple + 1` slices."""
    log_ratio = math.log(width / height)
    best, min_error = (1, 1), float("inf")
    for count in (multiple - 1, multiple, multiple + 1):
        if count == 1 or count > max_slice_nums:
            continue
        for cols in range(1, count + 1):
            if count % cols:
                continue
            # Exactly the reference's float expression: ties are broken by its last-bit rounding.
            error = abs(log_ratio - math.log(cols / (count // cols)))
            if error < min_error:
                best, min_error = (count // cols, cols), error
    return best


def _pre_resize_size(height: int, width: int, max_size: int) -> tuple[int, int]:
    """`(height, width)` after the reference evaluation's long-side resize to `max_size` (a side never drops below 1
    pixel)."""
    if width > height:
        return max(int((max_size / width) * height), 1), max_size
    return max_size, max(int((max_size / height) * width), 1)


@lru_cache(maxsize=8)
def _normalization_table(rescale_factor: float, mean: tuple, std: tuple) -> np.ndarray:
    """`[3, 256]` float32 table of `(value * rescale_factor - mean) / std` with CLIP's float32 arithmetic."""
    values = (np.arange(256, dtype=np.float64) * rescale_factor).astype(np.float32)
    mean = np.asarray(mean, dtype=np.float32)[:, None]
    std = np.asarray(std, dtype=np.float32)[:, None]
    return (values[None, :] - mean) / std


def _write_patches(out: np.ndarray, image: np.ndarray, rows: int, cols: int, table: np.ndarray) -> None:
    """Normalise an `[H, W, 3]` uint8 image with `table` and write it into `out` as patches.

    `out` is `[rows * cols * patches_per_tile, 3, patch, patch]`: the image cut into `rows x cols` tiles, tiles
    row-major, patches row-major within a tile, each patch channel-first (the layout of a `Conv2d` weight).
    """
    height, width, channels = image.shape
    patch = out.shape[-1]
    ph, pw = height // rows // patch, width // cols // patch
    # `out` seen in the image's own (y, x) order: each channel is one table look-up and one strided copy.
    target = out.reshape(rows, cols, ph, pw, channels, patch, patch).transpose(4, 0, 2, 5, 1, 3, 6)
    for channel in range(channels):
        target[channel] = table[channel].take(image[..., channel]).reshape(target.shape[1:])


class LlavaUhdImageProcessor(BaseImageProcessor):
    r"""
    LLaVA-UHD image processor. Every image is (optionally) resized so its long side is `max_image_size`, then cut
    into at most `max_slice_nums` slices whose grid best fits its aspect ratio, each of about
    `scale_resolution**2` pixels in multiples of `patch_size`, plus a low-resolution overview. Resizing is PIL
    bicubic, normalisation is CLIP's, exactly as in the reference implementation.

    Outputs are packed: `pixel_values` holds the `patch_size x patch_size` patches of every crop of every image
    (slices row-major, then the overview), `image_grid_hw` the patch grid of each crop and `slice_grid` the slice
    grid of each image, so batching is concatenation and nothing is padded.

    Args:
        max_slice_nums (`int`, *optional*, defaults to 7):
            Most slices per image. 1 disables slicing (overview only).
        scale_resolution (`int`, *optional*, defaults to 336):
            Side of the square whose area every crop approximates.
        patch_size (`int`, *optional*, defaults to 14):
            Vision patch size; crop sides are multiples of it.
        max_image_size (`int`, *optional*, defaults to 1024):
            Long side every image is resized to (up or down) before slicing, as in the reference evaluation.
            `NO_PRE_RESIZE` (0) slices the image at its own size, as the reference's training did (`None`, the former
            spelling of that, is deprecated: like every other setting, `None` is to mean the default).
        rescale_factor (`float`, *optional*, defaults to `1 / 255`):
            Scale applied to 8-bit pixel values.
        image_mean (`tuple[float]`, *optional*, defaults to CLIP's mean):
            Per-channel normalisation mean.
        image_std (`tuple[float]`, *optional*, defaults to CLIP's std):
            Per-channel normalisation std.
        apply_exif_orientation (`bool`, *optional*, defaults to `True`):
            Turn photos upright by their EXIF orientation tag before slicing, whichever way they come (path, URL, PIL
            image), as transformers' own image loading does. `False` uses the pixels as stored, as the reference's
            evaluation (`Image.open`) does; images that transformers loads itself (URLs in chat messages, pipelines)
            are turned upright before they reach the processor either way.
    """

    model_input_names = ["pixel_values", "image_grid_hw", "slice_grid"]
    valid_kwargs = LlavaUhdImageProcessorKwargs
    # The default of every setting (`SETTINGS`): what a setting not given (or `None`) is.
    max_slice_nums = 7
    scale_resolution = 336
    patch_size = 14
    max_image_size = 1024
    rescale_factor = 1 / 255
    image_mean = tuple(OPENAI_CLIP_MEAN)
    image_std = tuple(OPENAI_CLIP_STD)
    apply_exif_orientation = True
    do_rescale = True
    do_normalize = True

    def __init__(self, **kwargs: Unpack[LlavaUhdImageProcessorInitKwargs]):
        if "max_image_size" in kwargs:
            kwargs["max_image_size"] = legacy_max_image_size(kwargs["max_image_size"])
        settings = {name: kwargs.pop(name, None) for name in SETTINGS}
        super().__init__(**kwargs)
        for name, value in settings.items():
            setattr(self, name, getattr(self, name) if value is None else value)  # the class attribute: the default
        for name in ("max_slice_nums", "scale_resolution", "patch_size"):
            _check_positive_int(name, getattr(self, name))
        _check_max_image_size(self.max_image_size)
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)

    def get_slice_layout(
        self, height: int, width: int, max_slice_nums: int | None = None, max_image_size: int | None = None
    ) -> SliceLayout:
        """Layout of an image of `height x width` pixels (its size before the pre-resize, which is applied here).
        `max_slice_nums` and `max_image_size` override the processor's (`None`: the processor's; `max_image_size=0`:
        no pre-resize)."""
        _check_positive_int("height", height)
        _check_positive_int("width", width)
        max_slice_nums = self.max_slice_nums if max_slice_nums is None else max_slice_nums
        _check_positive_int("max_slice_nums", max_slice_nums)
        max_image_size = self.max_image_size if max_image_size is None else max_image_size
        _check_max_image_size(max_image_size)
        if max_image_size != NO_PRE_RESIZE:
            height, width = _pre_resize_size(height, width, max_image_size)
        scale, patch = self.scale_resolution, self.patch_size

        multiple = min(math.ceil(width * height / (scale * scale)), max_slice_nums)
        if multiple <= 1:
            return SliceLayout((height, width), _best_resize(height, width, scale, patch, upscale=True), None, None)

        overview = _best_resize(height, width, scale, patch, upscale=False)
        rows, cols = _best_grid(height, width, multiple, max_slice_nums)
        slice_size = _best_resize(
            _fit_to_multiple(height, rows) / rows, _fit_to_multiple(width, cols) / cols, scale, patch, upscale=True
        )
        return SliceLayout((height, width), overview, (rows, cols), slice_size)

    def preprocess(self, images: ImageLike | list[ImageLike] | list[list[ImageLike]], **kwargs) -> BatchFeature:
        """Slice, resize, normalise and pack one image or a (nested) list of images.

        Args:
            images: PIL images (float `F` images in [0, 1]), `uint8`/float (in [0, 1]) arrays or tensors (HWC or
                CHW), or local paths / URLs.
            kwargs: this call's values of `max_slice_nums` (a token budget), `max_image_size` (0: no pre-resize),
                `apply_exif_orientation`, `do_rescale`, `rescale_factor`, `do_normalize`, `image_mean`, `image_std`
                (`None`: the processor's), `input_data_format` (where an array's channels are) and `return_tensors`
                (`"pt"` or `None`). transformers' other image keywords (`size`, `resample`,
                `do_center_crop`, ...) do not apply to slicing and are refused.

        Returns:
            `BatchFeature` with `pixel_values` `[total_patches, 3 * patch_size**2]` (float32), `image_grid_hw`
            `[total_crops, 2]` and `slice_grid` `[num_images, 2]` (rows, cols; `(0, 0)` when not sliced).
        """
        settings = self._call_settings(kwargs)
        images = [
            _to_rgb(image, index, settings["apply_exif_orientation"], settings["input_data_format"])
            for index, image in enumerate(_flatten_images(images))
        ]
        layouts = [
            self.get_slice_layout(image.height, image.width, settings["max_slice_nums"], settings["max_image_size"])
            for image in images
        ]
        patch = self.patch_size
        grid_hw = [
            (size[0] // patch, size[1] // patch)
            for layout in layouts
            for size in [layout.slice_size] * layout.num_slices + [layout.overview_size]
        ]
        table = _normalization_table(
            float(settings["rescale_factor"]) if settings["do_rescale"] else 1.0,
            _per_channel(settings["image_mean"]) if settings["do_normalize"] else (0.0, 0.0, 0.0),
            _per_channel(settings["image_std"]) if settings["do_normalize"] else (1.0, 1.0, 1.0),
        )
        pixel_values = np.empty((sum(h * w for h, w in grid_hw), 3, patch, patch), dtype=np.float32)
        start = 0
        for image, layout in zip(images, layouts):
            height, width = layout.image_size
            if image.size != (width, height):
                image = image.resize((width, height), Image.Resampling.BICUBIC)
            resizes = [(layout.overview_size, (1, 1))]  # (size, tile grid): all slices come from one resize
            if layout.grid is not None:
                (rows, cols), (slice_h, slice_w) = layout.grid, layout.slice_size
                resizes.insert(0, ((rows * slice_h, cols * slice_w), layout.grid))
            for (resize_h, resize_w), (rows, cols) in resizes:
                end = start + (resize_h // patch) * (resize_w // patch)
                resized = np.asarray(image.resize((resize_w, resize_h), Image.Resampling.BICUBIC))
                _write_patches(pixel_values[start:end], resized, rows, cols, table)
                start = end
        slice_grid = [layout.grid or (0, 0) for layout in layouts]
        return BatchFeature(
            data={
                "pixel_values": torch.from_numpy(pixel_values.reshape(-1, 3 * patch * patch)),
                "image_grid_hw": torch.tensor(grid_hw, dtype=torch.long).reshape(-1, 2),
                "slice_grid": torch.tensor(slice_grid, dtype=torch.long).reshape(-1, 2),
            }
        )

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)

    def _call_settings(self, kwargs: dict) -> dict:
        """The processor's settings with this call's keywords over them; a keyword that cannot apply is refused."""
        unknown = sorted(set(kwargs) - set(LlavaUhdImageProcessorKwargs.__annotations__))
        if unknown:
            raise TypeError(f"Unexpected arguments for LlavaUhdImageProcessor: {unknown}.")
        given = {key: value for key, value in kwargs.items() if value is not None}
        if fixed := sorted(set(given) & set(FIXED_BY_SLICING)):
            raise ValueError(
                f"LlavaUhdImageProcessor does not take {fixed}: slicing decides every crop's size and resampling "
                "(use `max_slice_nums` and `max_image_size`)."
            )
        if given.get("do_convert_rgb") is False:
            raise ValueError("LlavaUhdImageProcessor always converts to RGB: `do_convert_rgb=False` is refused.")
        if given.get("return_tensors", "pt") not in ("pt", TensorType.PYTORCH):
            raise ValueError(f"`return_tensors` must be 'pt' or None, got {given['return_tensors']!r}.")
        settings = {name: given.get(name, getattr(self, name)) for name in CALL_SETTINGS}
        layout = str(getattr(given.get("input_data_format"), "value", given.get("input_data_format", "")))
        if layout not in ("", "channels_first", "channels_last"):
            raise ValueError(f"`input_data_format` must be 'channels_first' or 'channels_last', got {layout!r}.")
        return {**settings, "input_data_format": layout or None}


def _per_channel(value: float | list[float] | tuple[float, ...]) -> tuple[float, float, float]:
    """A mean or std for the three channels: one value for all, or one per channel."""
    values = tuple(value) if isinstance(value, (list, tuple)) else (value,) * 3
    if len(values) != 3:
        raise ValueError(f"`image_mean` and `image_std` take one value or three (RGB), got {value!r}.")
    return tuple(float(v) for v in values)


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


def legacy_max_image_size(max_image_size: int | None) -> int:
    """A `max_image_size` setting where `None` still means no pre-resize, its deprecated spelling (with a warning)."""
    if max_image_size is not None:
        return max_image_size
    warnings.warn(
        "`max_image_size=None` for no pre-resize is deprecated: pass `max_image_size=0` (`NO_PRE_RESIZE`), which "
        "also works per call, where `None` means the processor's own setting. A saved processor with "
        '`"max_image_size": null` still loads without pre-resize; saving it again writes 0.',
        FutureWarning,
        stacklevel=3,
    )
    return NO_PRE_RESIZE


def _check_max_image_size(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < NO_PRE_RESIZE:
        raise ValueError(
            f"`max_image_size` must be a positive integer, or {NO_PRE_RESIZE} for no pre-resize, got {value!r}."
        )


def _flatten_images(images) -> list:
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    return [images]


def _to_rgb(image: ImageLike, index: int, exif_orientation: bool, layout: str | None = None) -> Image.Image:
    """Any supported image input as an RGB PIL image (upright by its EXIF orientation tag if `exif_orientation`), with
    an error that names `images[index]`. `layout` (`channels_first` / `channels_last`) says how an array or tensor is
    laid out; without it, the layout is inferred."""
    name = f"images[{index}]"
    if isinstance(image, (str, os.PathLike)):
        image = _open_image(os.fspath(image), name)
    elif isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        # numpy has no bfloat16: widen it (exactly) to float32 first.
        image = _array_to_pil((image.float() if image.dtype == torch.bfloat16 else image).numpy(), name, layout)
    elif isinstance(image, np.ndarray):
        image = _array_to_pil(image, name, layout)
    elif not isinstance(image, Image.Image):
        raise TypeError(
            f"{name} must be a PIL image, a numpy array, a torch tensor or a path, got {type(image).__name__}."
        )
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as error:
        raise ValueError(f"{name} could not be decoded (corrupt or truncated image data): {error}") from error
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{name} is empty: {image.width}x{image.height} pixels.")
    if exif_orientation and image.getexif().get(EXIF_ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode == "F":
        image = _array_to_pil(np.asarray(image), f"{name} (PIL mode 'F')")
    elif image.mode in _WIDE_MODES:
        scaled = np.asarray(image, dtype=np.float64) / _WIDE_MODES[image.mode]
        image = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))
    return image if image.mode == "RGB" else image.convert("RGB")


def _open_image(source: str, name: str) -> Image.Image:
    try:
        if source.startswith(("http://", "https://")):
            with urllib.request.urlopen(source, timeout=URL_TIMEOUT) as response:
                return Image.open(io.BytesIO(response.read()))
        return Image.open(source)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{name}: no image file at {source!r}.") from error
    except urllib.error.URLError as error:
        raise ValueError(f"{name}: {source!r} could not be downloaded: {error}") from error
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as error:
        raise ValueError(f"{name}: {source!r} is not a readable image: {error}") from error


def _array_to_pil(array: np.ndarray, name: str, layout: str | None = None) -> Image.Image:
    """`[H, W]`, `[H, W, C]` or `[C, H, W]` arrays (C in 1, 3, 4): uint8, uint16, bool, or floats in [0, 1]. The
    channel axis is `layout`'s, else the first when only it has 1, 3 or 4 entries, else the last."""
    guessed_first = array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4)
    if array.ndim == 3 and (layout == "channels_first" if layout else guessed_first):
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(f"{name} must be an array of shape (H, W), (H, W, C) or (C, H, W), got {array.shape}.")
    if array.size == 0:
        raise ValueError(f"{name} is empty: shape {array.shape}.")
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * 255
    elif array.dtype == np.uint16:
        array = np.rint(array / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        if np.isnan(array).any() or low < 0.0 or high > 1.0:
            raise ValueError(f"{name} is a float array; expected values in [0, 1], got range [{low}, {high}].")
        array = np.rint(array * 255.0).astype(np.uint8)
    elif array.dtype != np.uint8:
        raise ValueError(f"{name} has dtype {array.dtype}; expected uint8, uint16, bool or float in [0, 1].")
    return Image.fromarray(np.ascontiguousarray(array))


__all__ = ["NO_PRE_RESIZE", "LlavaUhdImageProcessor", "SliceLayout"]
