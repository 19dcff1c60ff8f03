"""Caption an image: python examples/caption_image.py path/to/image.jpg [--model REPO_OR_DIR]."""

import argparse

from mlx_smolvlm import generate, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image", help="Image path or URL")
    parser.add_argument("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct")
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    model, processor = load(args.model)
    result = generate(
        model, processor, "Describe this image.", image=args.image, max_tokens=args.max_tokens
    )
    print(result.text)
    print(f"({result.generation_tokens} tokens at {result.generation_tps:.1f} tokens/s)")


if __name__ == "__main__":
    main()
