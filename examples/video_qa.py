"""Questions about a video with SmolVLM2, the video's frames encoded once for every question.

python examples/video_qa.py clip.mp4 "What happens?" "What colour is the car?" [--fps 1 --max-frames 64]

Needs PyAV: pip install 'mlx-smolvlm[video]'.
"""

import argparse

from mlx_smolvlm import PromptCache, generate, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("video", help="Video file (mp4, mov, webm, gif...)")
    parser.add_argument("questions", nargs="+", help="Questions, asked in order")
    parser.add_argument("--model", default="HuggingFaceTB/SmolVLM2-256M-Video-Instruct")
    parser.add_argument("--fps", type=float, default=None, help="Frames sampled per second")
    parser.add_argument("--max-frames", type=int, default=None, help="Most frames sampled")
    parser.add_argument("--max-tokens", type=int, default=200)
    args = parser.parse_args()

    model, processor = load(args.model)
    if processor.video_processor is None:
        parser.error(f"{args.model} has no video settings: use a SmolVLM2 checkpoint")
    # Unset, the checkpoint's video_sampling decides (SmolVLM2: 1 frame/s, at most 64).
    sampling = {"fps": args.fps, "max_frames": args.max_frames}
    sampling = {k: v for k, v in sampling.items() if v is not None}
    video = processor.video_processor.load(args.video, **sampling)
    print(f"{len(video.frames)} frames of {video.duration:.1f} s, at {video.times} s\n")

    cache = PromptCache(model)  # later questions prefill only their own tokens
    messages = []
    for i, question in enumerate(args.questions):
        content = [{"type": "text", "text": question}]
        if i == 0:
            content.insert(0, {"type": "video", "video": video})
        messages.append({"role": "user", "content": content})
        answer = generate(
            model, processor, messages, max_tokens=args.max_tokens, prompt_cache=cache
        )
        print(f"Q: {question}\nA: {answer.text}\n")
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer.text}]})


if __name__ == "__main__":
    main()
