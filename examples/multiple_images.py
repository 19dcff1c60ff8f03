"""Compare several images in one prompt: python examples/multiple_images.py a.jpg b.jpg [...]."""

import argparse

from mlx_smolvlm import generate, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("images", nargs="+", help="Image paths or URLs")
    parser.add_argument("--prompt", default="What is different between these images?")
    parser.add_argument("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct")
    args = parser.parse_args()

    model, processor = load(args.model)
    content = [{"type": "image", "image": path} for path in args.images]
    content.append({"type": "text", "text": args.prompt})
    messages = [{"role": "user", "content": content}]
    # Fewer tokens per image: at most 4 tiles each (plus the global view).
    result = generate(model, processor, messages, max_tokens=200, max_tiles=4)
    print(result.text)


if __name__ == "__main__":
    main()
