"""Image loading and the image processor: geometry, errors, and bit-exact parity with transformers."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import threading
import warnings

import numpy as np
import pytest
from conftest import real_model_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from mlx_smolvlm.processing.image import (
    ImageProcessor,
    array_to_image,
    fetch_image,
    fit_longest_edge,
    load_image,
    to_rgb,
)

# Processor geometry of the 256M/500M and the 2.2B checkpoints.
GEOMETRY_256M = {"size": {"longest_edge": 2048}, "max_image_size": {"longest_edge": 512}}
GEOMETRY_2B = {"size": {"longest_edge": 1536}, "max_image_size": {"longest_edge": 384}}
PIL_KEYS = (
    "do_convert_rgb do_image_splitting do_normalize do_pad do_rescale do_resize "
    "image_mean image_std max_image_size resample rescale_factor size"
).split()


def noise_image(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    """Random RGBA noise with a drawn shape, converted to `mode`."""
    rng = np.random.default_rng(seed)
    rgba = Image.fromarray(rng.integers(0, 256, (height, width, 4), dtype=np.uint8), "RGBA")
    ImageDraw.Draw(rgba).ellipse((0, 0, width // 2, height // 2), fill=(200, 30, 60, 128))
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (height, width)).astype(np.uint16))
    if mode == "P+transparency":
        image = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE)
        image.info["transparency"] = 3
        return image
    return rgba if mode == "RGBA" else rgba.convert(mode)


# A dozen+ sizes and modes: tiny, thin, wide/tall, exactly tile-sized, every PIL mode.
IMAGES = [
    (1, 1, "RGB"),
    (7, 300, "RGB"),
    (300, 7, "L"),
    (512, 512, "RGB"),
    (1024, 512, "P"),
    (384, 384, "RGBA"),
    (640, 480, "LA"),
    (333, 777, "CMYK"),
    (100, 50, "1"),
    (120, 90, "I;16"),
    (1500, 90, "RGB"),
    (90, 1300, "RGBA"),
    (257, 255, "P+transparency"),
    (768, 1152, "RGB"),
]


def build_ours(geometry: dict) -> ImageProcessor:
    config = json.loads((real_model_dir() / "preprocessor_config.json").read_text())
    config.update(geometry)
    return ImageProcessor(**{k: config[k] for k in PIL_KEYS})


def build_reference(geometry: dict, smolvlm: bool = False):
    pytest.importorskip("transformers")
    if smolvlm:
        from transformers.models.smolvlm.image_processing_pil_smolvlm import (
            SmolVLMImageProcessorPil as RefProcessor,
        )
    else:
        from transformers.models.idefics3.image_processing_pil_idefics3 import (
            Idefics3ImageProcessorPil as RefProcessor,
        )
    config = json.loads((real_model_dir() / "preprocessor_config.json").read_text())
    config.update(geometry)
    return RefProcessor(**{k: config[k] for k in PIL_KEYS})


def assert_same(ref_out, ours_out):
    """Pixel values bit-exact, masks and row/col grids equal."""
    assert ours_out["pixel_values"].shape == ref_out["pixel_values"].shape
    assert ours_out["pixel_values"].dtype == np.float32
    assert np.abs(ours_out["pixel_values"] - ref_out["pixel_values"]).max() == 0
    np.testing.assert_array_equal(
        ours_out["pixel_attention_mask"], ref_out["pixel_attention_mask"].astype(bool)
    )
    assert ours_out["rows"] == ref_out["rows"]
    assert ours_out["cols"] == ref_out["cols"]


# ---------------------------------------------------------------------------
# Parity with transformers (PIL backend)


@pytest.mark.torch
@pytest.mark.parametrize("split", [True, False])
@pytest.mark.parametrize("geometry,smolvlm", [(GEOMETRY_256M, False), (GEOMETRY_2B, True)])
def test_matches_reference_on_every_mode_and_size(geometry, smolvlm, split):
    ref, ours = build_reference(geometry, smolvlm), build_ours(geometry)
    images = [noise_image(w, h, mode, seed=i) for i, (w, h, mode) in enumerate(IMAGES)]
    # One image per call keeps the padded arrays small (an upscaled image is 17 frames).
    for image in images:
        expected = ref([[image]], do_image_splitting=split, return_row_col_info=True)
        assert_same(expected, ours([[image]], do_image_splitting=split))
    # Samples with different image counts exercise the padding.
    batch = [images[1:3], [], images[8:9]]
    expected = ref(batch, do_image_splitting=split, return_row_col_info=True)
    assert_same(expected, ours(batch, do_image_splitting=split))


@pytest.mark.torch
def test_matches_reference_on_a_large_photo_sized_image():
    ref, ours = build_reference(GEOMETRY_256M), build_ours(GEOMETRY_256M)
    batch = [[noise_image(4000, 3000, "RGB")]]
    expected = ref(batch, return_row_col_info=True)
    out = ours(batch)
    assert_same(expected, out)
    assert (out["rows"], out["cols"]) == ([[3]], [[4]])


@pytest.mark.torch
def test_matches_reference_with_per_call_overrides():
    ref, ours = build_reference(GEOMETRY_256M), build_ours(GEOMETRY_256M)
    batch = [[noise_image(900, 500, "RGB"), noise_image(200, 640, "RGBA", seed=1)]]
    expected = ref(
        batch,
        size={"longest_edge": 1000},
        max_image_size={"longest_edge": 384},
        return_row_col_info=True,
    )
    assert_same(expected, ours(batch, longest_edge=1000, max_image_size=384))


@pytest.mark.torch
def test_numpy_arrays_match_the_reference_array_path():
    ref, ours = build_reference(GEOMETRY_2B), build_ours(GEOMETRY_2B)
    rng = np.random.default_rng(3)
    arrays = [
        rng.integers(0, 256, (50, 70, 3), dtype=np.uint8),
        rng.integers(0, 256, (60, 40, 4), dtype=np.uint8),
    ]
    expected = ref([arrays], return_row_col_info=True)
    assert_same(expected, ours([[fetch_image(a) for a in arrays]]))


@pytest.mark.torch
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=st.integers(1, 700),
    height=st.integers(1, 700),
    mode=st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "CMYK", "1", "I;16"]),
    split=st.booleans(),
)
def test_random_sizes_match_reference(width, height, mode, split):
    ref, ours = _cached_pair()
    batch = [[noise_image(width, height, mode)]]
    expected = ref(batch, do_image_splitting=split, return_row_col_info=True)
    assert_same(expected, ours(batch, do_image_splitting=split))


@functools.lru_cache(maxsize=1)
def _cached_pair():
    return build_reference(GEOMETRY_2B, smolvlm=True), build_ours(GEOMETRY_2B)


@pytest.mark.torch
def test_load_image_matches_reference_load_image(tmp_path):
    image_utils = pytest.importorskip("transformers.image_utils")
    rgba = tmp_path / "rgba.png"
    noise_image(40, 30, "RGBA").save(rgba)
    rotated = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise when displayed
    noise_image(40, 30, "RGB").save(rotated, exif=exif)
    for path in (rgba, rotated):
        np.testing.assert_array_equal(
            np.asarray(load_image(path)), np.asarray(image_utils.load_image(str(path)))
        )
    assert load_image(rotated).size == (30, 40)


# ---------------------------------------------------------------------------
# Geometry and options (no reference needed)


def test_first_resize_follows_reference_rules():
    assert fit_longest_edge(300, 7, 2048) == (2048, 48)  # int(2048 * 7/300) = 47, made even
    assert fit_longest_edge(1, 1, 2048) == (2048, 2048)
    assert fit_longest_edge(1, 5000, 2048) == (1, 2048)  # clamped to at least 1
    assert fit_longest_edge(100, 200, 8192) == (2048, 4096)  # the 4096 cap


def test_shapes_dtypes_and_grid():
    processor = ImageProcessor(size={"longest_edge": 1024}, max_image_size={"longest_edge": 256})
    out = processor([[noise_image(1024, 512)], [noise_image(512, 512)]])
    assert out["pixel_values"].dtype == np.float32
    assert out["pixel_attention_mask"].dtype == np.bool_
    # 1024x512 -> 2x4 tiles + global = 9 frames; 512x512 -> 1024x1024 -> 4x4 + global = 17.
    assert out["pixel_values"].shape == (2, 17, 3, 256, 256)
    assert out["rows"] == [[2], [4]] and out["cols"] == [[4], [4]]
    assert out["pixel_attention_mask"][0, :9].all() and not out["pixel_attention_mask"][0, 9:].any()


def test_padding_frames_are_zero_and_masked():
    processor = ImageProcessor(**GEOMETRY_256M, do_image_splitting=False)
    out = processor([[noise_image(10, 10)], [noise_image(10, 10), noise_image(30, 10)]])
    assert out["pixel_values"].shape == (2, 2, 3, 512, 512)
    assert not out["pixel_values"][0, 1].any() and not out["pixel_attention_mask"][0, 1].any()
    assert out["pixel_attention_mask"][1].all()


def test_upscale_false_keeps_small_images_unsplit():
    processor = ImageProcessor(**GEOMETRY_256M)
    small = noise_image(300, 200)
    assert processor([[small]])["rows"] == [[3]]  # default: upscaled to 2048x1366 and split
    out = processor([[small]], upscale=False)
    assert (out["rows"], out["cols"]) == ([[0]], [[0]])
    assert out["pixel_values"].shape == (1, 1, 3, 512, 512)
    # Large images are still brought down to the longest edge.
    big = processor([[noise_image(3000, 1000)]], upscale=False)
    assert (big["rows"], big["cols"]) == ([[2]], [[4]])


@pytest.mark.parametrize("max_tiles", [0, 1, 2, 4, 6, 100])
def test_max_tiles_bounds_the_grid(max_tiles):
    processor = ImageProcessor(**GEOMETRY_256M)
    image = noise_image(800, 600)
    out = processor([[image]], max_tiles=max_tiles)
    assert out["rows"][0][0] * out["cols"][0][0] <= max_tiles
    if max_tiles >= 12:  # the default grid (4x3) already fits: nothing changes
        np.testing.assert_array_equal(out["pixel_values"], processor([[image]])["pixel_values"])


def test_splitting_off_gives_one_frame_per_image():
    processor = ImageProcessor(**GEOMETRY_2B, do_image_splitting=False)
    out = processor([[noise_image(1000, 100), noise_image(5, 5)]])
    assert out["pixel_values"].shape == (1, 2, 3, 384, 384)
    assert out["rows"] == [[0, 0]]


def test_composites_transparency_onto_white():
    transparent = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(transparent).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("LA", (4, 4), (0, 255))).getpixel((0, 0)) == (0, 0, 0)


def test_from_pretrained_reads_the_real_config(smolvlm_256m_dir):
    processor = ImageProcessor.from_pretrained(smolvlm_256m_dir)
    assert (processor.longest_edge, processor.tile_size) == (2048, 512)
    assert processor.resample == Image.Resampling.LANCZOS and processor.do_image_splitting


@pytest.mark.parametrize(
    "config,message",
    [
        ({"max_image_size": {"longest_edge": 512}}, "size"),
        ({"size": {"shortest_edge": 5}, "max_image_size": {"longest_edge": 512}}, "longest_edge"),
        (
            {"size": {"longest_edge": 9}, "max_image_size": {"longest_edge": 3}, "image_mean": [1]},
            "image_mean",
        ),
        (
            {"size": {"longest_edge": 9}, "max_image_size": {"longest_edge": 3}, "resample": 42},
            "resample",
        ),
    ],
)
def test_from_pretrained_errors_name_the_file(tmp_path, config, message):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message) as err:
        ImageProcessor.from_pretrained(tmp_path)
    assert "preprocessor_config.json" in str(err.value)


def test_from_pretrained_missing_or_broken_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------
# load_image


def test_load_image_sources(tmp_path):
    path = tmp_path / "a.png"
    noise_image(20, 10).save(path)
    expected = np.asarray(noise_image(20, 10))
    for source in (path, str(path), Image.open(path)):
        np.testing.assert_array_equal(np.asarray(load_image(source)), expected)
    data_uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    np.testing.assert_array_equal(np.asarray(load_image(data_uri)), expected)


def test_load_image_from_url(tmp_path):
    noise_image(12, 8).save(tmp_path / "x.png")
    handler = functools.partial(QuietHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}"
        assert load_image(f"{url}/x.png").size == (12, 8)
        with pytest.raises(ValueError, match="missing.png"):
            load_image(f"{url}/missing.png")
    finally:
        server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_numpy_arrays():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), rgb)
    gray = np.full((4, 3), 7, dtype=np.uint8)
    assert load_image(gray).getpixel((0, 0)) == (7, 7, 7)
    assert load_image(np.ones((2, 2, 3), dtype=np.float32)).getpixel((0, 0)) == (255, 255, 255)
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # fully transparent black
    assert array_to_image(rgba).getpixel((0, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="shape"):
        load_image(np.zeros((2, 2, 5), dtype=np.uint8))


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jpg"):
        load_image(tmp_path / "nope.jpg")


def test_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_image(tmp_path)


def test_not_an_image_is_named(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, not pixels")
    with pytest.raises(ValueError, match="notes.txt"):
        load_image(path)


def test_truncated_jpeg_is_named(tmp_path):
    buffer = io.BytesIO()
    noise_image(64, 64).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ValueError, match="cut.jpg"):
        load_image(path)


@pytest.mark.parametrize(
    "side", [40, 100]
)  # over the limit (PIL warns) and over twice it (PIL raises)
def test_decompression_bomb_is_refused(tmp_path, monkeypatch, side):
    path = tmp_path / "bomb.png"
    Image.new("L", (side, side)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ValueError, match="bomb.png"):
            load_image(path)


def test_unsupported_type():
    with pytest.raises(TypeError, match="int"):
        load_image(42)
