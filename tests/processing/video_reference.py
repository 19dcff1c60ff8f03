"""transformers' SmolVLM2 video processing, run in a separate Python that has torchvision.

`SmolVLMVideoProcessor` needs torchvision, which does not import beside the test
environment's torch; tests/test_video.py runs this script with $SMOLVLM_VIDEO_REF_PYTHON:

    python video_reference.py CASES.json OUT_DIR

CASES.json holds a list of {"checkpoint", "messages", "fps"?, "max_frames"?}. For case i
OUT_DIR/i.npz gets input_ids, pixel_values, pixel_attention_mask (the chat path:
apply_chat_template(tokenize=True)) and frames_<v> (video v's decoded sampled frames);
stdout gets a JSON list with each case's chat text, expanded text and video metadata.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from transformers import AutoProcessor
from transformers.video_utils import load_video


def pyav_fetch(videos, sample_indices_fn=None):
    """The video processor's fetch_videos, decoding with PyAV (its default wants torchcodec)."""
    if isinstance(videos, list):
        return list(zip(*[pyav_fetch(v, sample_indices_fn) for v in videos]))
    return load_video(videos, backend="pyav", sample_indices_fn=sample_indices_fn)


def run_case(case: dict, out: Path) -> dict:
    """Process one case with the reference and save its arrays to `out`."""
    processor = AutoProcessor.from_pretrained(case["checkpoint"])
    processor.video_processor.fetch_videos = pyav_fetch
    messages = case["messages"]
    sampling = {"fps": case.get("fps"), "num_frames": case.get("max_frames")}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor.apply_chat_template(
        messages,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="np",
        processor_kwargs=sampling or None,
    )
    paths = [
        block["path"]
        for message in messages
        for block in message["content"]
        if isinstance(block, dict) and block.get("type") == "video"
    ]
    videos = processor.video_processor(
        videos=paths,
        do_sample_frames=True,
        return_metadata=True,
        return_tensors="np",
        fps=sampling.get("fps", processor.video_processor.fps),
        num_frames=sampling.get("num_frames", processor.video_processor.num_frames),
    )
    replacements = [processor.replace_video_token(videos, i) for i in range(len(paths))]
    expanded = processor.get_text_with_replacements([text], [], replacements)[0][0]
    arrays = {
        k: np.asarray(inputs[k]) for k in ("input_ids", "pixel_values", "pixel_attention_mask")
    }
    metadata = []
    for i, (path, meta) in enumerate(zip(paths, videos["video_metadata"])):
        frames, _ = pyav_fetch(path, lambda metadata, m=meta, **_: m.frames_indices)
        arrays[f"frames_{i}"] = frames
        metadata.append(
            {
                "indices": [int(x) for x in meta.frames_indices],
                "fps": meta.fps,
                "duration": meta.duration,
                "total_frames": meta.total_num_frames,
            }
        )
    np.savez(out, **arrays)
    return {"text": text, "expanded": expanded, "videos": metadata}


def main() -> None:
    cases = json.loads(Path(sys.argv[1]).read_text())
    out_dir = Path(sys.argv[2])
    print(json.dumps([run_case(case, out_dir / f"{i}.npz") for i, case in enumerate(cases)]))


if __name__ == "__main__":
    main()
