"""Image loading and the Idefics3/SmolVLM image processor, in pure PIL + numpy.

The numbers match transformers' `Idefics3ImageProcessorPil` / `SmolVLMImageProcessorPil`
bit for bit: every resize goes through PIL with the same sizes and filter, and the
rescale/normalize steps use the same dtypes in the same order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from ..utils.validation import check_resize_shape, read_json
from .fetch import FetchLimits, open_image

# Absolute cap on the resized longest edge, as in the reference ("4k resolution").
MAX_IMAGE_SIZE = 4096

ImageSource = Any  # str | Path | PIL.Image.Image | np.ndarray


# ---------------------------------------------------------------------------
# Loading


def load_image(source: ImageSource, timeout: float = 10.0) -> Image.Image:
    """Load a path, URL, data URI, PIL image or numpy array as an upright RGB PIL image."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray) or _is_array_like(source):
        image = array_to_image(np.asarray(source))
    elif isinstance(source, (str, Path)):
        image = open_image(source, FetchLimits(timeout=timeout))
    else:
        raise TypeError(
            f"Cannot load an image from {type(source).__name__}: expected a path, an http(s) URL, "
            "a PIL image or a numpy array"
        )
    # Same as transformers' load_image: EXIF orientation, then a plain RGB conversion
    # (alpha is dropped, not composited, on this path).
    return ImageOps.exif_transpose(image).convert("RGB")


def fetch_image(source: ImageSource, timeout: float = 10.0) -> Image.Image:
    """Turn a processor input into a PIL image the way the reference processor does."""
    # The reference only loads sources (paths, URLs); PIL images go to the image
    # processor untouched, so their alpha is composited onto white there and no EXIF
    # transpose happens.
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray) or _is_array_like(source):
        return array_to_image(np.asarray(source))
    return load_image(source, timeout)


def _is_array_like(source: Any) -> bool:
    """A torch tensor, mlx array or other object numpy can read (not a path or a PIL image)."""
    return hasattr(source, "__array__") and not isinstance(source, (str, Path, Image.Image))


def array_to_image(array: np.ndarray) -> Image.Image:
    """Convert an HWC (1, 3 or 4 channels), CHW (1 or 3) or HW numpy image to an RGB PIL image."""
    if array.ndim == 3 and array.shape[0] in (1, 3):
        # Channels first, as transformers infers it (the first axis wins when both could be).
        array = array.transpose(1, 2, 0)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
        raise ValueError(
            f"Cannot use a numpy array of shape {array.shape} as an image: expected HW, HWC "
            "with 1, 3 or 4 channels, or CHW with 1 or 3"
        )
    array = _to_uint8(array)
    if array.ndim == 3 and array.shape[-1] == 4:
        array = _composite_on_white(array)
    return Image.fromarray(array).convert("RGB")


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """Bring a numpy image to uint8: floats in [0, 1] are scaled by 255, others clipped."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if (
        np.issubdtype(array.dtype, np.floating)
        and array.size
        and array.min() >= 0
        and array.max() <= 1
    ):
        array = array * 255.0
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Blend a uint8 RGBA array onto white with the reference's float formula."""
    alpha = rgba[..., 3:4] / 255
    blended = alpha * rgba[..., :3] + (1 - alpha) * 255
    return np.round(blended).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB, compositing transparency onto white like transformers 5."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


# ---------------------------------------------------------------------------
# Geometry (the reference's formulas, including its int() truncations)


def fit_longest_edge(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Size with the longest edge set to `longest_edge`, the other made even, capped at 4096."""
    aspect = width / height
    if width >= height:
        width = longest_edge
        height = int(width / aspect)
        height += height % 2
    else:
        height = longest_edge
        width = int(height * aspect)
        width += width % 2
    height, width = max(height, 1), max(width, 1)
    return _cap_size(height, width, MAX_IMAGE_SIZE)


def _cap_size(height: int, width: int, cap: int) -> tuple[int, int]:
    """Shrink a size so that its longest edge is at most `cap`."""
    aspect = width / height
    if width >= height and width > cap:
        width = cap
        height = int(width / aspect)
    elif height > width and height > cap:
        height = cap
        width = int(height * aspect)
    return max(height, 1), max(width, 1)


def encoder_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Size rounded up to whole tiles along both edges, keeping the aspect ratio."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def tile_grid(height: int, width: int, tile: int) -> tuple[int, int]:
    """Rows and columns of tiles for an encoder-sized image; (0, 0) when one tile covers it."""
    if height > tile or width > tile:
        return (height - tile) // tile + 1, (width - tile) // tile + 1
    return 0, 0


def resized_size(height: int, width: int, longest_edge: int, upscale: bool) -> tuple[int, int]:
    """Size after the first resize; with upscale=False small images keep their size."""
    if not upscale and max(height, width) <= longest_edge:
        return height, width
    return fit_longest_edge(height, width, longest_edge)


def edge_for_max_tiles(
    height: int, width: int, longest_edge: int, tile: int, upscale: bool, max_tiles: int
) -> int:
    """Largest longest edge (`longest_edge` or a smaller multiple of `tile`) giving <= max_tiles."""
    smaller = [k * tile for k in range(math.ceil(longest_edge / tile) - 1, 0, -1)]
    for edge in [longest_edge, *smaller]:
        rows, cols = tile_grid(
            *encoder_size(*resized_size(height, width, edge, upscale), tile), tile
        )
        if rows * cols <= max_tiles:
            return edge
    return tile  # one tile always fits: the image is then not split at all


# ---------------------------------------------------------------------------
# The processor


def _longest_edge(value: Any, key: str) -> dict[str, int]:
    """Validate a `{"longest_edge": int}` size entry."""
    edge = value.get("longest_edge") if isinstance(value, dict) else None
    if not isinstance(edge, int) or isinstance(edge, bool) or edge < 1:
        raise ValueError(
            f"{key} must be a dict with a positive integer 'longest_edge', got {value!r}"
        )
    return {"longest_edge": edge}


@dataclass
class ImageProcessor:
    """Idefics3/SmolVLM image processor: resize, split into tiles, normalize, pad."""

    size: dict[str, int] = field(default_factory=lambda: {"longest_edge": 4 * 364})
    max_image_size: dict[str, int] = field(default_factory=lambda: {"longest_edge": 364})
    do_resize: bool = True
    do_image_splitting: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    image_std: list[float] = field(default_factory=lambda: [0.5, 0.5, 0.5])
    do_pad: bool = True
    do_convert_rgb: bool = True
    resample: int = Image.Resampling.LANCZOS
    # Defaults of the call's `upscale` / `max_tiles` (an adapter's training settings set them).
    upscale: bool = True
    max_tiles: int | None = None

    def __post_init__(self) -> None:
        self.size = _longest_edge(self.size, "size")
        self.max_image_size = _longest_edge(self.max_image_size, "max_image_size")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if not isinstance(values, (list, tuple)) or len(values) != 3:
                raise ValueError(f"{name} must be a list of 3 numbers, got {values!r}")
        if int(self.resample) not in set(Image.Resampling):
            raise ValueError(f"resample must be a PIL resampling filter id, got {self.resample!r}")

    @property
    def longest_edge(self) -> int:
        """Longest edge of the first resize (`size.longest_edge`)."""
        return self.size["longest_edge"]

    @property
    def tile_size(self) -> int:
        """Side of one square tile fed to the vision encoder (`max_image_size.longest_edge`)."""
        return self.max_image_size["longest_edge"]

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ImageProcessor:
        """Build the processor from a checkpoint directory's preprocessor_config.json."""
        file = Path(path) / "preprocessor_config.json"
        config = read_json(file)
        missing = [key for key in ("size", "max_image_size") if key not in config]
        if missing:
            raise ValueError(f"{file} lacks the required key(s) {missing}")
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{key: value for key, value in config.items() if key in known})
        except (TypeError, ValueError) as err:
            raise ValueError(f"Bad value in {file}: {err}") from err

    def __call__(
        self,
        images: list[list[Image.Image]] | list[Image.Image] | Image.Image,
        do_image_splitting: bool | None = None,
        longest_edge: int | None = None,
        max_image_size: int | None = None,
        upscale: bool | None = None,
        max_tiles: int | None = None,
    ) -> dict[str, Any]:
        """Process a batch (list of per-sample lists) of PIL images into padded pixel arrays."""
        batch = _nest(images)
        split = self.do_image_splitting if do_image_splitting is None else do_image_splitting
        upscale = self.upscale if upscale is None else upscale
        max_tiles = self.max_tiles if max_tiles is None else max_tiles
        edge = longest_edge or self.longest_edge
        tile = max_image_size or self.tile_size
        if max_tiles is not None and max_tiles < 0:
            raise ValueError(f"max_tiles must be >= 0, got {max_tiles}")
        frames, rows, cols = [], [], []
        for sample in batch:
            sample_frames, sample_rows, sample_cols = [], [], []
            for image in sample:
                tiles, r, c = self._split(image, edge, tile, split, upscale, max_tiles)
                sample_frames.extend(self._normalize(t) for t in tiles)
                sample_rows.append(r)
                sample_cols.append(c)
            frames.append(sample_frames)
            rows.append(sample_rows)
            cols.append(sample_cols)
        out: dict[str, Any] = {"rows": rows, "cols": cols}
        if self.do_pad:
            out["pixel_values"], out["pixel_attention_mask"] = _pad(frames)
        else:
            out["pixel_values"] = [
                np.stack(f) if f else np.zeros((0, 3, tile, tile), np.float32) for f in frames
            ]
        return out

    def _split(
        self,
        image: Image.Image,
        edge: int,
        tile: int,
        split: bool,
        upscale: bool,
        max_tiles: int | None,
    ) -> tuple[list[np.ndarray], int, int]:
        """Resize one image and cut it into uint8 HWC frames (tiles row-major, global last)."""
        image = self._as_rgb(image)
        if self.do_resize:
            if max_tiles is not None:
                edge = edge_for_max_tiles(image.height, image.width, edge, tile, upscale, max_tiles)
            image = self._resize(image, resized_size(image.height, image.width, edge, upscale))
        if not split:
            return [np.asarray(self._resize(image, (tile, tile)))], 0, 0
        image = self._resize(image, encoder_size(image.height, image.width, tile))
        rows, cols = tile_grid(image.height, image.width, tile)
        if rows == 0:
            return [np.asarray(image)], 0, 0
        pixels = np.asarray(image)
        tiles = [
            pixels[r * tile : (r + 1) * tile, c * tile : (c + 1) * tile]
            for r in range(rows)
            for c in range(cols)
        ]
        tiles.append(np.asarray(self._resize(image, (tile, tile))))  # the global view, squashed
        return tiles, rows, cols

    def _as_rgb(self, image: Image.Image) -> Image.Image:
        """Apply do_convert_rgb; without it only RGB input makes sense (3 channels)."""
        if self.do_convert_rgb:
            return to_rgb(image)
        if image.mode != "RGB":
            raise ValueError(
                f"do_convert_rgb is off but the image is in mode {image.mode}, not RGB"
            )
        return image

    def _resize(self, image: Image.Image, size: tuple[int, int]) -> Image.Image:
        """Resize to (height, width) with the configured PIL filter."""
        height, width = size
        return image.resize((width, height), resample=Image.Resampling(self.resample))

    def _normalize(self, frame: np.ndarray) -> np.ndarray:
        """uint8 HWC frame -> float32 CHW, rescaled then normalized with the reference dtypes."""
        pixels: np.ndarray = frame.transpose(2, 0, 1)
        if self.do_rescale:
            # float64 product, float32 result: the reference's rescale.
            pixels = (pixels.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if self.do_normalize:
            if not np.issubdtype(pixels.dtype, np.floating):
                pixels = pixels.astype(np.float32)
            mean = np.asarray(self.image_mean, dtype=pixels.dtype)[:, None, None]
            std = np.asarray(self.image_std, dtype=pixels.dtype)[:, None, None]
            pixels = (pixels - mean) / std
        return pixels.astype(np.float32, copy=False)


def _nest(images: Any) -> list[list[Image.Image]]:
    """Accept one image, a flat list (one sample) or a list of per-sample lists."""
    if isinstance(images, Image.Image):
        return [[images]]
    images = list(images)
    if images and all(isinstance(x, (list, tuple)) for x in images):
        return [list(x) for x in images]
    if all(isinstance(x, Image.Image) for x in images):
        return [images]
    raise TypeError("images must be a PIL image, a list of them, or a list of lists of them")


def _pad(frames: list[list[np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Zero-pad to (batch, max frames, 3, max H, max W) with a mask of the real pixels."""
    all_frames = [f for sample in frames for f in sample]
    if not all_frames:
        raise ValueError("No images found in the batch")
    height = max(f.shape[1] for f in all_frames)
    width = max(f.shape[2] for f in all_frames)
    count = max(len(sample) for sample in frames)
    pixels = np.zeros((len(frames), count, 3, height, width), dtype=np.float32)
    mask = np.zeros((len(frames), count, height, width), dtype=bool)
    for i, sample in enumerate(frames):
        for j, frame in enumerate(sample):
            pixels[i, j, :, : frame.shape[1], : frame.shape[2]] = frame
            mask[i, j, : frame.shape[1], : frame.shape[2]] = True
    return pixels, mask


def load_images(sources: Any, resize_shape: tuple[int, int] | None = None) -> list[Image.Image]:
    """Load images (paths, URLs...), each resized to HEIGHT x WIDTH `resize_shape` if given."""
    check_resize_shape(resize_shape)
    images = [load_image(source) for source in sources]
    if resize_shape:
        height, width = resize_shape
        images = [im.resize((width, height), Image.Resampling.LANCZOS) for im in images]
    return images
