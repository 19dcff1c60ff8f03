"""SmolVLM2 video and multi-image input against transformers: frames, prompt text, ids, logits.

transformers' video processor needs torchvision, which does not import beside this
environment's torch. Without it the pieces it is made of still run here (PyAV reader, frame
sampler, prompt builder, chat template, tokenizer, model); the whole processor runs in
another Python given by $SMOLVLM_VIDEO_REF_PYTHON (tests/processing/video_reference.py).
"""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
import types
import wave
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import real_model_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from reference import copy_tokenizer_files, hf_logits, save_hf_checkpoint
from reference import tiny_config_for_real_tokenizer as tiny_config
from test_processor import hf_tokenizer, reference_processor

from mlx_smolvlm.processing.processor import Processor, image_prompt_string
from mlx_smolvlm.processing.video import (
    VIDEO_CHAT_TEMPLATE,
    Video,
    VideoProcessor,
    load_video,
    number_to_words,
    sample_frame_indices,
    video_from_frames,
    video_prompt_string,
)

ROOT = Path(__file__).resolve().parents[2]
REF_PYTHON = os.environ.get("SMOLVLM_VIDEO_REF_PYTHON")
SAMPLING = {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 512}}
# name: (file, frames, fps, width, height)
VIDEOS = {
    "clip": ("clip.mp4", 60, 8, 160, 120),  # 7.5 s: 8 frames at 1 fps
    "portrait": ("portrait.mov", 12, 4, 120, 160),
    "long": ("long.avi", 36, 4, 96, 64),  # 9 s: with max_frames 4 the edges are skipped
    "gif": ("anim.gif", 10, 5, 64, 48),
    "webm": ("clip.webm", 60, 8, 160, 120),  # Matroska: no frame count in the header
}
CODECS = {"mp4": "libx264", "mov": "libx264", "avi": "mpeg4", "gif": "gif", "webm": "libvpx-vp9"}


def frame(index: int, width: int, height: int) -> np.ndarray:
    """Frame `index`: grey level 4*index (luma survives lossy coding) and a moving green bar."""
    pixels = np.full((height, width, 3), 4 * (index % 64), np.uint8)
    left = (index * 5) % width
    pixels[height // 4 : height // 2, left : left + width // 8, 1] = 255
    return pixels


def encode(path: Path, count: int, fps: int, width: int, height: int) -> Path:
    """Write `count` synthetic frames at `fps` with PyAV."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(CODECS[path.suffix[1:]], rate=Fraction(fps))
        stream.width, stream.height = width, height
        stream.pix_fmt = "rgb8" if path.suffix == ".gif" else "yuv420p"
        for i in range(count):
            image = av.VideoFrame.from_ndarray(frame(i, width, height), format="rgb24")
            container.mux(stream.encode(image))
        container.mux(stream.encode())
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("av")
    folder = tmp_path_factory.mktemp("videos")
    return {name: encode(folder / file, *spec) for name, (file, *spec) in VIDEOS.items()}


def write_smolvlm2_files(path: Path) -> Path:
    """Tokenizer and chat template of SmolVLM-256M with SmolVLM2's processor settings."""
    real = real_model_dir()
    copy_tokenizer_files(real, path)
    config = json.loads((real / "preprocessor_config.json").read_text())
    config.update(
        image_processor_type="SmolVLMImageProcessor",
        processor_class="SmolVLMProcessor",
        video_sampling=SAMPLING,
    )
    (path / "preprocessor_config.json").write_text(json.dumps(config))
    processor_config = {"image_seq_len": 64, "processor_class": "SmolVLMProcessor"}
    (path / "processor_config.json").write_text(json.dumps(processor_config))
    return path


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory) -> Path:
    path = write_smolvlm2_files(tmp_path_factory.mktemp("smolvlm2"))
    (path / "config.json").write_text(json.dumps({"model_type": "smolvlm"}))
    return path


@pytest.fixture(scope="module")
def processor(processor_dir) -> Processor:
    return Processor.from_pretrained(processor_dir)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, processor_dir):
    """A tiny random `smolvlm` model with the real tokenizer, its transformers twin, and ours."""
    pytest.importorskip("transformers")
    pytest.importorskip("torch")
    from mlx_smolvlm import load

    path = tmp_path_factory.mktemp("tiny-smolvlm2")
    hf = save_hf_checkpoint(path, tiny_config("smolvlm"), seed=5, tokenizer_dir=processor_dir)
    return path, hf, *load(path)


def video_message(path: Any, text: str = "What happens?", first: bool = True) -> list[dict]:
    content = [{"type": "video", "path": str(path)}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content if first else content[::-1]}]


# ---------------------------------------------------------------------------
# transformers' pieces that run without torchvision


def hf_sampler(max_frames: int, fps: float):
    """SmolVLMVideoProcessor.sample_frames with these settings (it reads nothing else of self)."""
    video_processing = pytest.importorskip("transformers.models.smolvlm.video_processing_smolvlm")
    method = video_processing.SmolVLMVideoProcessor.sample_frames
    return functools.partial(method, types.SimpleNamespace(), num_frames=max_frames, fps=fps)


def hf_video_prompt(metadata, frame_count: int, image_seq_len: int = 64) -> str:
    """SmolVLMProcessor.replace_video_token for one video's metadata."""
    pytest.importorskip("num2words")
    from transformers.models.smolvlm.processing_smolvlm import SmolVLMProcessor

    tokens = types.SimpleNamespace(
        image_seq_len=image_seq_len,
        image_token="<image>",
        fake_image_token="<fake_token_around_image>",
        global_image_token="<global-img>",
    )
    inputs = {"pixel_values": np.zeros((1, frame_count)), "video_metadata": [metadata]}
    return SmolVLMProcessor.replace_video_token(tokens, inputs, 0)


def hf_video_utils() -> types.ModuleType:
    """transformers.video_utils (PyAV reader, VideoMetadata), or skip."""
    return pytest.importorskip("transformers.video_utils")


def hf_read(path: Path, max_frames: int = 64, fps: float = 1):
    """transformers' PyAV reader with SmolVLM's sampler: (frames, metadata)."""
    return hf_video_utils().read_video_pyav(str(path), hf_sampler(max_frames, fps))


def default_template() -> str:
    """The template transformers' SmolVLMProcessor uses for messages with a video."""
    processing = pytest.importorskip("transformers.models.smolvlm.processing_smolvlm")
    return processing.DEFAULT_CHAT_TEMPLATE


# ---------------------------------------------------------------------------
# Prompt text and sampling


def test_number_words_and_prompt_layout():
    assert [number_to_words(n) for n in (0, 8, 21, 64, 100, 101, 1001, 1100)] == [
        "zero", "eight", "twenty-one", "sixty-four", "one hundred", "one hundred and one",
        "one thousand and one", "one thousand, one hundred",
    ]  # fmt: skip
    video = Video([None, None], [0.0, 61.9], [0, 1], 2, 1 / 61.9, 3725.0)
    assert video_prompt_string(video, "<F>") == (
        "You are provided the following series of two frames from a 1:02:05 [H:MM:SS] video.\n"
        "\nFrame from 00:00:<F>\nFrame from 01:01:<F>\n\n"
    )


def test_number_words_match_num2words():
    num2words = pytest.importorskip("num2words").num2words
    for n in [*range(2100), 12345, 100001, 101000, 1000100, 1234567, 10**9 + 7]:
        assert number_to_words(n) == num2words(n), n


FPS = [0.5, 1, 6.25, 8, 23.976, 24, 25, 29.97, 30, 60]


@pytest.mark.torch
@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(1, 5000),
    video_fps=st.sampled_from(FPS),
    fps=st.sampled_from([0.25, 0.5, 1, 2, 3.5, 8]),
    max_frames=st.integers(1, 128),
    stretch=st.sampled_from([1.0, 0.5, 2.0]),  # caller-given durations need not be total/fps
)
def test_sampling_matches_transformers(total, video_fps, fps, max_frames, stretch):
    duration = total / video_fps * stretch
    metadata = hf_video_utils().VideoMetadata(
        total_num_frames=total, fps=video_fps, duration=duration
    )
    expected = hf_sampler(max_frames, fps)(metadata).tolist()
    assert sample_frame_indices(total, video_fps, duration, fps, max_frames) == expected


@pytest.mark.torch
@settings(max_examples=100, deadline=None)
@given(
    total=st.integers(1, 400_000),
    video_fps=st.sampled_from(FPS),
    count=st.integers(1, 70),
)
def test_video_prompt_matches_transformers(total, video_fps, count):
    indices = np.unique(np.linspace(0, total - 1, count, dtype=int)).tolist()
    duration = total / video_fps
    metadata = hf_video_utils().VideoMetadata(
        total, video_fps, duration=duration, frames_indices=indices
    )
    video = Video(
        [None] * len(indices), [i / video_fps for i in indices], indices, total, video_fps, duration
    )
    frame_prompt = image_prompt_string(0, 0, 2)
    assert video_prompt_string(video, frame_prompt) == hf_video_prompt(metadata, len(indices), 2)


CONVERSATIONS = [
    video_message("a.mp4"),
    video_message("a.mp4", first=False),
    [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Same?"}]},
        {"role": "assistant", "content": "Yes."},
        {"role": "user", "content": [{"type": "video"}, {"type": "image"}]},
    ],
]  # fmt: skip


@pytest.mark.torch
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_video_messages_use_transformers_default_template(processor, messages):
    for generation in (True, False):
        expected = processor.apply_chat_template(
            messages, add_generation_prompt=generation, chat_template=default_template()
        )
        assert processor.apply_chat_template(messages, add_generation_prompt=generation) == expected
    assert VIDEO_CHAT_TEMPLATE != processor.chat_template  # the checkpoint's drops videos
    assert "<video>" not in processor.apply_chat_template(
        messages, chat_template=processor.chat_template
    )


# ---------------------------------------------------------------------------
# Decoding and the processor, against transformers' pieces


@pytest.mark.torch
@pytest.mark.parametrize(
    "name,max_frames,fps",
    [("clip", 64, 1), ("clip", 5, 2), ("portrait", 64, 1), ("long", 4, 1), ("gif", 64, 3)],
)
def test_decoding_matches_transformers_pyav_reader(videos, name, max_frames, fps):
    expected_frames, metadata = hf_read(videos[name], max_frames, fps)
    video = load_video(videos[name], fps=fps, max_frames=max_frames)
    assert video.indices == metadata.frames_indices.tolist()
    assert (video.total_frames, video.fps, video.duration) == (
        metadata.total_num_frames,
        metadata.fps,
        metadata.duration,
    )
    assert video.times == metadata.timestamps
    np.testing.assert_array_equal(np.stack(video.frames), expected_frames)


def test_sampled_frames_hold_the_expected_content(videos):
    video = load_video(videos["clip"])
    assert video.indices == [0, 8, 16, 25, 33, 42, 50, 59]
    greys = [float(f[-20:].mean()) for f in video.frames]  # below the moving bar
    assert greys == pytest.approx([4 * i for i in video.indices], abs=1)
    skipped = load_video(videos["long"], max_frames=4)  # 9 s: the first and last second go
    assert skipped.indices == [4, 13, 22, 32] and skipped.duration == 9


@pytest.mark.torch
def test_webm_frames_are_counted(videos):
    # transformers' reader trusts the header's frame count, which WebM lacks: it sees 0
    # frames and takes frame 0 alone. Counting the packets gives the MP4's sampling.
    _, metadata = hf_read(videos["webm"])
    assert metadata.total_num_frames == 0
    webm, mp4 = load_video(videos["webm"]), load_video(videos["clip"])
    assert (webm.indices, webm.total_frames, webm.duration) == (mp4.indices, 60, 7.5)


@pytest.mark.torch
def test_token_ids_match_transformers(videos, processor):
    messages = video_message(videos["clip"])
    text = hf_tokenizer().apply_chat_template(
        messages, chat_template=default_template(), tokenize=False, add_generation_prompt=True
    )
    frames, metadata = hf_read(videos["clip"])
    expanded = text.replace("<video>", hf_video_prompt(metadata, len(frames)))
    expected = hf_tokenizer()(expanded)["input_ids"]
    assert processor.apply_chat_template(messages, tokenize=True) == [expected]
    assert len(expected) == 658  # 8 frames, as REFERENCE.md's 7.5 s clip


def test_frames_list_gives_the_file_inputs(videos, processor):
    all_frames = load_video(videos["gif"], sample=False)
    assert all_frames.indices == list(range(10))
    pil_frames = [Image.fromarray(f) for f in all_frames.frames]
    text = processor.apply_chat_template(video_message("x"))
    from_file = processor(text, videos=[videos["gif"]], fps=2)
    from_frames = processor(text, videos=[video_from_frames(pil_frames, fps=5)], fps=2)
    assert from_file["pixel_values"].shape[1] == 4
    for key in ("input_ids", "pixel_values", "pixel_attention_mask"):
        np.testing.assert_array_equal(from_frames[key], from_file[key])
    unsampled = processor(text, videos=[videos["gif"]], do_sample_frames=False)
    assert unsampled["pixel_values"].shape[1] == 10


def test_frame_durations_time_the_prompt():
    frames = [frame(i, 32, 24) for i in range(4)]
    video = video_from_frames(frames, durations=[0.5, 61.0, 2.0, 0.5])
    assert video.times == [0.0, 0.5, 61.5, 63.5] and video.duration == 64
    prompt = video_prompt_string(video.sample(fps=1, max_frames=64), "")
    assert "four frames from a 0:01:04" in prompt
    assert "00:00:\nFrame from 00:00:\nFrame from 01:01:\nFrame from 01:03:" in prompt


def test_sampling_overrides_per_call(videos, processor):
    messages = video_message(videos["clip"])
    text = processor.apply_chat_template(messages)
    assert (
        processor(text, videos=[videos["clip"]], fps=2, max_frames=5)["pixel_values"].shape[1] == 5
    )
    (ids,) = processor.apply_chat_template(messages, tokenize=True, fps=0.5)
    assert ids.count(processor.image_token_id) == 4 * 64
    assert "series of four frames" in processor.tokenizer.decode(ids)


def test_images_and_video_interleave_in_prompt_order(videos, processor):
    small, wide = Image.new("RGB", (40, 40), "red"), Image.new("RGB", (900, 300), "blue")
    content = [
        {"type": "image", "image": small},
        {"type": "text", "text": "then"},
        {"type": "video", "path": str(videos["portrait"])},
        {"type": "image", "image": wide},
        {"type": "text", "text": "Same colours?"},
    ]
    text = processor.apply_chat_template([{"role": "user", "content": content}])
    edge = {"longest_edge": 1024}  # 2x2 and 1x2 tiles
    out = processor(text, images=[small, wide], videos=[videos["portrait"]], **edge)
    first, second = (processor("<image>", images=[im], **edge) for im in (small, wide))
    clip = processor("<video>", videos=[videos["portrait"]])
    expected = [first["pixel_values"][0], clip["pixel_values"][0], second["pixel_values"][0]]
    assert [len(x) for x in expected] == [5, 3, 3]
    np.testing.assert_array_equal(out["pixel_values"][0], np.concatenate(expected))
    assert out["pixel_attention_mask"].all()
    # Each placeholder's expansion, as the single-medium calls above tokenized it.
    decode = functools.partial(processor.tokenizer.decode, skip_special_tokens=False)
    fill = {
        "<image>": iter([decode(first["input_ids"][0]), decode(second["input_ids"][0])]),
        "<video>": iter([decode(clip["input_ids"][0])]),
    }
    expanded = "".join(
        next(fill[p]) if p in fill else p for p in re.split("(<image>|<video>)", text)
    )
    assert out["input_ids"][0].tolist() == processor.tokenizer.encode(expanded)


# ---------------------------------------------------------------------------
# Errors


def test_bad_video_files_fail_clearly(videos, tmp_path, processor):
    import av

    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    # FFmpeg may probe a text file as an ANSI-art "video" (its tty demuxer): refused too.
    (tmp_path / "notes.txt").write_text("hello, this is not a video\n" * 20)
    with wave.open(str(tmp_path / "tone.wav"), "wb") as audio:
        audio.setnchannels(1)
        audio.setsampwidth(2)
        audio.setframerate(8000)
        audio.writeframes(bytes(16000))
    for ext in ("mp4", "mkv"):  # a video stream and not one frame in it
        with av.open(str(tmp_path / f"none.{ext}"), "w") as container:
            stream = container.add_stream("libx264", rate=4)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            container.start_encoding()
    cases = {
        "missing.mp4": (FileNotFoundError, "Video file not found"),
        "empty.mp4": (ValueError, "Cannot read video"),
        "junk.mp4": (ValueError, "Cannot read video"),
        "notes.txt": (ValueError, "has no video stream|Cannot read video"),
        "tone.wav": (ValueError, "has no video stream"),
        "none.mp4": (ValueError, "has no video stream"),
        "none.mkv": (ValueError, "Cannot read video"),
    }
    for name, (error, message) in cases.items():
        path = tmp_path / name
        with pytest.raises(error, match=message) as caught:
            load_video(path)
        assert str(path) in str(caught.value)
        with pytest.raises(error, match=name):
            processor.apply_chat_template(video_message(path), tokenize=True)


def test_video_settings_from_each_config_layout(tmp_path):
    video = {"size": {"longest_edge": 1024}, "max_image_size": {"longest_edge": 384}}
    video["video_sampling"] = {"fps": 2, "max_frames": 16, "video_size": {"longest_edge": 384}}
    layouts = {
        "preprocessor_config.json": video,
        "video_preprocessor_config.json": video,
        "processor_config.json": {"image_seq_len": 81, "video_processor": video},  # transformers 5
    }
    for name, config in layouts.items():
        folder = tmp_path / name.split(".")[0]
        folder.mkdir()
        (folder / name).write_text(json.dumps(config))
        loaded = VideoProcessor.from_pretrained(folder)
        assert (loaded.fps, loaded.max_frames) == (2, 16)
        frames = loaded.frame_processor
        assert (frames.longest_edge, frames.tile_size) == (1024, 384)  # `size` wins, as upstream
    assert VideoProcessor.from_pretrained(real_model_dir()) is None  # SmolVLM 1: no video
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="preprocessor_config.json: invalid JSON"):
        VideoProcessor.from_pretrained(tmp_path / "bad")


def test_bad_sampling_and_inputs_fail_clearly(videos, processor):
    clip = str(videos["clip"])
    with pytest.raises(
        ValueError, match=f"max_frames must be a positive integer, got 0 \\(video {clip}"
    ):
        load_video(clip, max_frames=0)
    text = processor.apply_chat_template(video_message(clip))
    with pytest.raises(ValueError, match="max_frames .* got 0"):
        processor(text, videos=[clip], max_frames=0)
    with pytest.raises(ValueError, match="fps must be positive"):
        processor(text, videos=[clip], fps=0)
    with pytest.raises(ValueError, match=r"1 <video> placeholder\(s\).* 2 video"):
        processor(text, videos=[clip, clip])
    with pytest.raises(ValueError, match="0 video"):
        processor(text)
    with pytest.raises(TypeError, match="video_from_frames"):
        processor(text, videos=[[np.zeros((8, 8, 3), np.uint8)]])
    with pytest.raises(ValueError, match="either fps or durations"):
        video_from_frames([np.zeros((8, 8, 3), np.uint8)])
    with pytest.raises(ValueError, match="no frames"):
        video_from_frames([], fps=1)
    smolvlm1 = Processor.from_pretrained(real_model_dir())
    with pytest.raises(ValueError, match="no video settings"):
        smolvlm1("<video>", videos=[clip])
    assert smolvlm1("<video>")["input_ids"].size > 0  # plain text for SmolVLM 1


def test_missing_pyav_says_how_to_install(videos, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)
    with pytest.raises(ImportError, match=r"mlx-smolvlm\[video\]"):
        load_video(videos["clip"])


# ---------------------------------------------------------------------------
# Model parity and generation


def assert_logits_close(ours, ref):
    ours = np.array(ours)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 1e-4
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.torch
def test_video_logits_match_transformers(videos, checkpoint):
    from mlx_smolvlm.generation import prepare_inputs

    _, hf, model, processor = checkpoint
    picture = Image.new("RGB", (300, 200), (20, 120, 200))
    messages = video_message(videos["clip"], "Is this in the clip?")
    messages[0]["content"].insert(1, {"type": "image", "image": picture})
    inputs = prepare_inputs(processor, messages, max_frames=4, do_image_splitting=False)
    assert inputs["pixel_values"].shape[1] == 5  # 4 frames, then the image
    args = [inputs[k] for k in ("input_ids", "pixel_values", "pixel_attention_mask")]
    assert_logits_close(model(*args), hf_logits(hf, *args))


@pytest.mark.torch
def test_generate_with_video_matches_transformers_greedy(videos, checkpoint):
    import torch

    from mlx_smolvlm.generation import generate, prepare_inputs

    _, hf, model, processor = checkpoint
    inputs = prepare_inputs(processor, "What happens?", video=videos["portrait"], max_frames=3)
    assert "three frames" in processor.tokenizer.decode(inputs["input_ids"][0])
    with torch.no_grad():
        ref = hf.generate(
            **{k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()},
            max_new_tokens=8,
            do_sample=False,
        )
    expected = ref[0, inputs["input_ids"].shape[1] :].tolist()
    result = generate(
        model, processor, "What happens?", video=str(videos["portrait"]), max_tokens=8, max_frames=3
    )
    stopped = expected[-1] in processor.tokenizer.eos_token_ids
    assert result.token_ids == (expected[:-1] if stopped else expected)


@pytest.mark.torch
def test_bare_video_parts_take_the_video_argument(videos, checkpoint):
    from mlx_smolvlm.generation import prepare_inputs

    processor = checkpoint[3]
    bare = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "Hi"}]}]
    named = video_message(videos["gif"], "Hi")
    ours = prepare_inputs(processor, bare, video=videos["gif"])
    np.testing.assert_array_equal(ours["input_ids"], prepare_inputs(processor, named)["input_ids"])
    with pytest.raises(ValueError, match="1 video parts without a source but 0 videos"):
        prepare_inputs(processor, bare)


@pytest.mark.torch
def test_cli_answers_about_a_video(videos, checkpoint):
    from click.testing import CliRunner

    from mlx_smolvlm.generate import main

    model = ["--model", str(checkpoint[0]), "--max-tokens", "3"]
    run = functools.partial(CliRunner().invoke, main)
    out = run([*model, "--video", str(videos["gif"]), "--fps", "2", "--max-frames", "2"])
    assert out.exit_code == 0, out.output
    assert "Prompt:" in out.output
    out = run([*model, "--video", "nowhere.mp4"])
    assert out.exit_code != 0 and "nowhere.mp4" in out.output
    out = run([*model, "--fps", "2"])
    assert out.exit_code != 0 and "--video" in out.output


@pytest.mark.torch
def test_video_qa_example_runs(videos, checkpoint, monkeypatch, capsys):
    import runpy

    argv = ["video_qa.py", str(videos["gif"]), "What?", "And?", "--model", str(checkpoint[0])]
    monkeypatch.setattr(sys, "argv", [*argv, "--max-frames", "2", "--max-tokens", "2"])
    runpy.run_path(str(ROOT / "examples" / "video_qa.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert out.startswith("2 frames of 2.0 s") and out.count("Q: ") == 2


# ---------------------------------------------------------------------------
# Several images, against transformers' Idefics3Processor (no torchvision needed)


def noise(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def turn(role: str, *parts: Any) -> dict:
    content = [
        {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p}
        for p in parts
    ]
    return {"role": role, "content": content}


MULTI_IMAGE = {
    "three sizes, one turn": [turn("user", noise(500, 400, 0), "and", noise(90, 700, 1), noise(700, 120, 2), "differences?")],
    "one image per turn": [
        turn("user", noise(700, 90, 3), "What is this?"),
        turn("assistant", "Noise."),
        turn("user", "And this one?", noise(120, 500, 4)),
    ],
}  # fmt: skip


@pytest.mark.torch
@pytest.mark.parametrize("case", MULTI_IMAGE)
def test_several_images_match_transformers(case, checkpoint):
    from mlx_smolvlm.generation import prepare_inputs

    _, hf, model, processor = checkpoint
    messages = MULTI_IMAGE[case]
    # A 1024 longest edge still splits every image (into 2x2, 2x1 or 1x2 tiles) but keeps
    # the prompts short enough for a quick forward pass.
    ref = reference_processor().apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
        processor_kwargs={"size": {"longest_edge": 1024}},
    )
    ours = prepare_inputs(processor, messages, longest_edge=1024)
    assert ours["pixel_values"].shape[1] == (11 if len(messages) == 1 else 6)
    np.testing.assert_array_equal(ours["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(ours["pixel_values"], ref["pixel_values"])
    np.testing.assert_array_equal(
        ours["pixel_attention_mask"], ref["pixel_attention_mask"].astype(bool)
    )
    args = [ours[k] for k in ("input_ids", "pixel_values", "pixel_attention_mask")]
    assert_logits_close(model(*args), hf_logits(hf, *args))


# ---------------------------------------------------------------------------
# The whole reference video processor, in the torchvision Python

# (video, fps, max_frames, video before the text)
REF_CASES = [("clip", None, None, True), ("clip", 2, 5, False), ("portrait", None, None, True), ("long", 1, 4, True), ("gif", 3, None, True)]  # fmt: skip


@pytest.fixture(scope="module")
def reference_runs(videos, processor_dir, tmp_path_factory):
    if not REF_PYTHON:
        pytest.skip(
            "SMOLVLM_VIDEO_REF_PYTHON is unset: it names a Python with torchvision, which does "
            "not install beside this torch; build one as .ci/run does (the .ci-ref venv) "
            "and export SMOLVLM_VIDEO_REF_PYTHON=$PWD/.ci-ref/bin/python"
        )
    out = tmp_path_factory.mktemp("video-reference")
    cases = [
        {
            "checkpoint": str(processor_dir),
            "messages": video_message(videos[name], first=first),
            "fps": fps,
            "max_frames": most,
        }
        for name, fps, most, first in REF_CASES
    ]
    (out / "cases.json").write_text(json.dumps(cases))
    helper = Path(__file__).with_name("video_reference.py")
    proc = subprocess.run(
        [REF_PYTHON, str(helper), str(out / "cases.json"), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return [(result, dict(np.load(out / f"{i}.npz"))) for i, result in enumerate(results)]


@pytest.mark.parametrize("case", range(len(REF_CASES)))
def test_whole_video_pipeline_matches_transformers(case, reference_runs, videos, processor):
    from mlx_smolvlm.generation import prepare_inputs

    name, fps, most, first = REF_CASES[case]
    ref, arrays = reference_runs[case]
    messages = video_message(videos[name], first=first)
    sampling = {k: v for k, v in {"fps": fps, "max_frames": most}.items() if v is not None}
    video = processor.video_processor.load(videos[name], **sampling)
    assert video.indices == ref["videos"][0]["indices"]
    assert (video.fps, video.duration, video.total_frames) == tuple(
        ref["videos"][0][k] for k in ("fps", "duration", "total_frames")
    )
    np.testing.assert_array_equal(np.stack(video.frames), arrays["frames_0"])
    text = processor.apply_chat_template(messages)
    assert text == ref["text"]
    frame_prompt = image_prompt_string(0, 0, processor.image_seq_len)
    assert text.replace("<video>", video_prompt_string(video, frame_prompt)) == ref["expanded"]
    ours = prepare_inputs(processor, messages, **sampling)
    np.testing.assert_array_equal(ours["input_ids"], arrays["input_ids"])
    np.testing.assert_array_equal(
        ours["pixel_attention_mask"], arrays["pixel_attention_mask"].astype(bool)
    )
    # transformers resizes video frames with torchvision's LANCZOS, we with PIL's (as for
    # images): each of the two resizes may round a pixel to the neighbouring level of 255,
    # which is 2/255 after (x/255 - 0.5) / 0.5.
    diff = np.abs(ours["pixel_values"] - arrays["pixel_values"])
    assert diff.max() <= 4 / 255 + 1e-6
    assert diff.mean() < 1e-3
    assert (diff < 1e-6).mean() > 0.95
