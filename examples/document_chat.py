"""Multi-turn questions about a document page, reusing the KV cache between turns.

python examples/document_chat.py page.png "What is the title?" "Who wrote it?" [--model ...]
"""

import argparse

from mlx_smolvlm import PromptCache, generate, load


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("image", help="Document image path or URL")
    parser.add_argument("questions", nargs="+", help="Questions, asked in order")
    parser.add_argument("--model", default="HuggingFaceTB/SmolVLM-256M-Instruct")
    args = parser.parse_args()

    model, processor = load(args.model)
    cache = PromptCache(model)  # the page is encoded once, each turn prefills only new tokens
    messages = []
    for i, question in enumerate(args.questions):
        content = [{"type": "text", "text": question}]
        if i == 0:
            content.insert(0, {"type": "image", "image": args.image})
        messages.append({"role": "user", "content": content})
        answer = generate(model, processor, messages, max_tokens=200, prompt_cache=cache)
        print(f"Q: {question}\nA: {answer.text}\n")
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer.text}]})


if __name__ == "__main__":
    main()
