"""SmolVLM2 video input: decoding, frame sampling, frame pixels and the prompt text.

Follows transformers' `SmolVLMVideoProcessor` and `SmolVLMProcessor.replace_video_token`:
the same frames are sampled and the prompt reads the same (frame count in words, `H:MM:SS`
duration, `MM:SS` timestamps). Frames are resized with PIL's LANCZOS like the image
processor; the reference resizes videos with torchvision's LANCZOS, which rounds a few
pixels differently (by at most 2 of 255 levels over its two resizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..utils.validation import read_json
from .image import ImageProcessor, array_to_image, to_rgb

VIDEO_TOKEN = "<video>"
# What SmolVLM2 checkpoints ship in preprocessor_config.json's `video_sampling`.
DEFAULT_FPS = 1.0
DEFAULT_MAX_FRAMES = 64
# Videos longer than this many seconds beyond the sampled span lose a second at each end.
SKIP_SECONDS = 1

_INTRO = (
    "You are provided the following series of {count} frames from a {duration} [H:MM:SS] video.\n"
)
_FRAME = "\nFrame from {minutes:02d}:{seconds:02d}:"
_OUTRO = "\n\n"

# The template transformers' SmolVLMProcessor switches to whenever messages hold a video
# (SmolVLM2 checkpoints' own templates only know text and image blocks).
VIDEO_CHAT_TEMPLATE = (
    "<|im_start|>\n"
    "{%- for message in messages -%}\n"
    "  {{- message.role | capitalize -}}\n"
    "  {%- if message.content is string -%}\n"
    "    {{- ': ' ~ message.content -}}\n"
    "  {%- else -%}\n"
    "    {{- ':' if message.content[0].type == 'image' else ': ' -}}\n"
    "    {%- for part in message.content -%}\n"
    "      {%- if part.type == 'text' -%}{{- part.text -}}\n"
    "      {%- elif part.type in ('image', 'video') -%}{{- '<' ~ part.type ~ '>' -}}\n"
    "      {%- endif -%}\n"
    "    {%- endfor -%}\n"
    "  {%- endif -%}\n"
    "  {{- '<end_of_utterance>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


# ---------------------------------------------------------------------------
# Prompt text

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ((10**12, "trillion"), (10**9, "billion"), (10**6, "million"), (10**3, "thousand"))


def number_to_words(n: int) -> str:
    """A count (n >= 0) in English words as num2words spells it: 'sixty-four', 'one thousand and one'."""
    groups = []
    for scale, name in _SCALES:
        head, n = divmod(n, scale)
        if head:
            groups.append(f"{number_to_words(head)} {name}")
    if not groups:
        return _below_thousand(n)
    if n == 0:
        return ", ".join(groups)
    # A units group under a hundred joins with "and", anything else with a comma.
    return ", ".join(groups) + (" and " if n < 100 else ", ") + _below_thousand(n)


def _below_thousand(n: int) -> str:
    """Words for 0..999."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        tens, ones = divmod(n, 10)
        return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")
    hundreds, rest = divmod(n, 100)
    return f"{_ONES[hundreds]} hundred" + (f" and {_below_thousand(rest)}" if rest else "")


def video_prompt_string(video: Video, frame_prompt: str) -> str:
    """The text that replaces one <video>: intro, then a timestamp and `frame_prompt` per frame."""
    duration = str(timedelta(seconds=int(video.duration)))
    text = _INTRO.format(count=number_to_words(len(video.frames)), duration=duration)
    for second in video.times:
        stamp = _FRAME.format(minutes=int(second // 60), seconds=int(second % 60))
        text += stamp + frame_prompt
    return text + _OUTRO


# ---------------------------------------------------------------------------
# Frame sampling


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    duration: float,
    fps: float = DEFAULT_FPS,
    max_frames: int = DEFAULT_MAX_FRAMES,
) -> list[int]:
    """Indices of the frames to keep: `fps` per second, at most `max_frames`, spread evenly."""
    wanted = max(1, min(round(fps * duration), max_frames))
    start, end = 0, total_frames - 1
    # Long videos (more than max_frames at fps, plus a second at each end) drop their edges.
    if duration - 2 * SKIP_SECONDS > max_frames * fps:
        start = int(SKIP_SECONDS * video_fps)
        end = min(int(total_frames - SKIP_SECONDS * video_fps), total_frames - 1)
    if start >= end:
        start, end = 0, total_frames - 1
    return np.unique(np.linspace(start, end, wanted, dtype=int)).tolist()


def _check_sampling(fps: float, max_frames: int, name: str) -> None:
    """Clear errors for sampling settings the formula would silently turn into one frame."""
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
        raise ValueError(
            f"max_frames must be a positive integer, got {max_frames!r} (video {name})"
        )
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r} (video {name})")


# ---------------------------------------------------------------------------
# Videos


@dataclass(frozen=True)
class Video:
    """Frames of one video (uint8 RGB, HWC) with the timing that the prompt quotes."""

    frames: list[np.ndarray]
    times: list[float]  # seconds from the start, one per frame
    indices: list[int]  # position of each frame in the source
    total_frames: int
    fps: float  # source frames per second
    duration: float  # seconds
    name: str = "<frames>"
    sampled: bool = False  # True once only the sampled frames are kept

    def sample(self, fps: float, max_frames: int) -> Video:
        """Keep the frames that SmolVLM2's sampling picks (a no-op once sampled)."""
        _check_sampling(fps, max_frames, self.name)
        if self.sampled:
            return self
        keep = sample_frame_indices(self.total_frames, self.fps, self.duration, fps, max_frames)
        return replace(
            self,
            frames=[self.frames[i] for i in keep],
            times=[self.times[i] for i in keep],
            indices=[self.indices[i] for i in keep],
            sampled=True,
        )


def video_from_frames(
    frames: Any,
    fps: float | None = None,
    durations: list[float] | None = None,
    name: str = "<frames>",
) -> Video:
    """A video from PIL images or HWC arrays (or one FHWC array), timed by `fps` or per-frame `durations` (s)."""
    images = [_frame_array(f, name) for f in frames]
    if not images:
        raise ValueError(f"Video {name} has no frames")
    if (fps is None) == (durations is None):
        raise ValueError(f"Give the frame rate of video {name} as either fps or durations")
    if durations is not None:
        if len(durations) != len(images) or min(durations) < 0 or sum(durations) <= 0:
            raise ValueError(
                f"Video {name}: durations must be {len(images)} non-negative seconds, not all zero"
            )
        times = np.concatenate([[0.0], np.cumsum(durations)[:-1]]).tolist()
        duration = float(sum(durations))
        fps = len(images) / duration
    else:
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps!r} (video {name})")
        times = [i / fps for i in range(len(images))]
        duration = len(images) / fps
    return Video(images, times, list(range(len(images))), len(images), float(fps), duration, name)


def _frame_array(frame: Any, name: str) -> np.ndarray:
    """One frame as a uint8 RGB HWC array."""
    if isinstance(frame, Image.Image):
        return np.asarray(to_rgb(frame))
    if isinstance(frame, np.ndarray):
        return np.asarray(array_to_image(frame))
    raise TypeError(
        f"Video {name}: frames must be PIL images or numpy arrays, got {type(frame).__name__}"
    )


def load_video(
    source: str | Path,
    fps: float = DEFAULT_FPS,
    max_frames: int = DEFAULT_MAX_FRAMES,
    sample: bool = True,
) -> Video:
    """Decode a video file with PyAV, keeping only the frames that sampling picks (all without `sample`)."""
    name = str(source)
    _check_sampling(fps, max_frames, name)
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"Video file not found: {path}")
    with _open(path) as container:
        stream = container.streams.video[0]
        video_fps = float(stream.average_rate or stream.guessed_rate or 0)
        total = stream.frames
    if total == 0:
        # Matroska/WebM headers carry no frame count (transformers then takes frame 0 only).
        with _open(path) as container:
            total = sum(1 for p in container.demux(container.streams.video[0]) if p.size)
    if total == 0 or video_fps <= 0:
        raise ValueError(f"Video {path} has no frames (or no frame rate)")
    duration = total / video_fps
    keep = (
        sample_frame_indices(total, video_fps, duration, fps, max_frames)
        if sample
        else list(range(total))
    )
    indices, frames = _decode(path, keep)
    times = [i / video_fps for i in indices]
    return Video(frames, times, indices, total, video_fps, duration, name, sampled=True)


def _import_av() -> Any:
    """PyAV, or an ImportError that says how to install it."""
    try:
        import av  # optional dependency: the [video] extra
    except ImportError as err:
        raise ImportError(
            "Reading video files needs PyAV: pip install 'mlx-smolvlm[video]' (or pip install av)"
        ) from err
    return av


def _open(path: Path) -> Any:
    """Open a container that has a video stream, with errors naming the file."""
    av = _import_av()
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, EOFError) as err:
        raise ValueError(f"Cannot read video {path}: {err}") from err
    # FFmpeg's tty demuxer renders any text file as an ANSI-art "video".
    if not container.streams.video or container.format.name == "tty":
        container.close()
        raise ValueError(f"{path} has no video stream")
    return container


def _decode(path: Path, keep: list[int]) -> tuple[list[int], list[np.ndarray]]:
    """Decode frames in order and return those whose position is in `keep`."""
    av = _import_av()
    wanted, last = set(keep), max(keep)
    indices, frames = [], []
    with _open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame-parallel decoding; same frames, same order
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i > last:
                    break
                if i in wanted:
                    indices.append(i)
                    frames.append(frame.to_ndarray(format="rgb24"))
        except (av.error.FFmpegError, EOFError) as err:
            raise ValueError(f"Cannot decode video {path}: {err}") from err
    if not frames:
        raise ValueError(f"Video {path} has no decodable frames")
    return indices, frames


# ---------------------------------------------------------------------------
# The video processor


def _video_config(path: Path) -> tuple[dict[str, Any], Path] | None:
    """The first processor config of a checkpoint that has `video_sampling`, and its file."""
    # transformers 5 saves one processor_config.json with a "video_processor" section;
    # hub checkpoints have preprocessor_config.json (or video_preprocessor_config.json).
    candidates = [
        (path / "processor_config.json", "video_processor"),
        (path / "video_preprocessor_config.json", None),
        (path / "preprocessor_config.json", None),
    ]
    for file, section in candidates:
        if not file.exists():
            continue
        config = read_json(file)
        if section is not None:
            config = config.get(section)
        if isinstance(config, dict) and isinstance(config.get("video_sampling"), dict):
            return config, file
    return None


@dataclass
class VideoProcessor:
    """Samples, decodes and turns videos into square normalized frames, as SmolVLM2 expects."""

    fps: float = DEFAULT_FPS
    max_frames: int = DEFAULT_MAX_FRAMES
    # Does the per-frame work: resize to the longest edge, then squash to one tile.
    frame_processor: ImageProcessor = field(
        default_factory=lambda: ImageProcessor(
            size={"longest_edge": 512},
            max_image_size={"longest_edge": 512},
            do_image_splitting=False,
            do_pad=False,
        )
    )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> VideoProcessor | None:
        """The checkpoint's video settings, or None when it has no `video_sampling` (SmolVLM 1)."""
        found = _video_config(Path(path))
        if found is None:
            return None
        config, file = found
        sampling = config["video_sampling"]
        # Like transformers: a top-level `size` (the image size in SmolVLM2 checkpoints)
        # replaces video_sampling's video_size.
        size = config.get("size") or sampling.get("video_size") or {"longest_edge": 512}
        keys = ("max_image_size", "resample", "do_resize", "do_rescale", "rescale_factor")
        keys += ("do_normalize", "image_mean", "image_std", "do_convert_rgb")
        settings = {k: config[k] for k in keys if k in config}
        try:
            frames = ImageProcessor(size=size, do_image_splitting=False, do_pad=False, **settings)
            return cls(
                fps=sampling.get("fps", DEFAULT_FPS),
                max_frames=sampling.get("max_frames", DEFAULT_MAX_FRAMES),
                frame_processor=frames,
            )
        except (TypeError, ValueError) as err:
            raise ValueError(f"Bad video settings in {file}: {err}") from err

    def load(
        self,
        source: Any,
        fps: float | None = None,
        max_frames: int | None = None,
        sample: bool = True,
    ) -> Video:
        """A `Video` from a file path or a `Video`, with this processor's sampling unless overridden."""
        fps = self.fps if fps is None else fps
        max_frames = self.max_frames if max_frames is None else max_frames
        if isinstance(source, Video):
            return source.sample(fps, max_frames) if sample else source
        if isinstance(source, (str, Path)):
            return load_video(source, fps, max_frames, sample)
        raise TypeError(
            f"A video must be a file path or a Video, got {type(source).__name__}; "
            "wrap decoded frames with mlx_smolvlm.processing.video.video_from_frames(frames, fps=...)"
        )

    def __call__(self, video: Video) -> np.ndarray:
        """Float32 (frames, 3, tile, tile) pixels of a video's frames."""
        frames = [Image.fromarray(f) for f in video.frames]
        return self.frame_processor([frames], do_image_splitting=False)["pixel_values"][0]


__all__ = [
    "VIDEO_CHAT_TEMPLATE",
    "VIDEO_TOKEN",
    "Video",
    "VideoProcessor",
    "load_video",
    "number_to_words",
    "sample_frame_indices",
    "video_from_frames",
    "video_prompt_string",
]
