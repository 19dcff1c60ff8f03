"""colpali-engine's ColIdefics3 (torch) on random weights, run in a separate Python.

colpali-engine needs torchvision (which does not import beside the test environment's
torch), so tests/test_retrieval.py runs this script with $SMOLVLM_COLPALI_REF_PYTHON (an
environment that .ci/run builds):

    python colpali_reference.py SPEC.json OUT.npz

SPEC.json: {"config": config.json dict, "checkpoint": folder to write the random
ColIdefics3 to (tokenizer/processor files already there), "seed", "adapter": null or
{"path", "r", "alpha", "target_modules", "seed"} (a PEFT LoRA adapter on that checkpoint,
as the colSmol releases are), "images": [image paths], "queries": [strings]}.

OUT.npz gets, for pages and queries, the processor's input_ids/attention_mask (and the
pages' pixel_values/pixel_attention_mask), the model's padded embeddings, and
`scores` = processor.score(query embeddings, page embeddings) on unpadded embeddings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from colpali_engine.models import ColIdefics3, ColIdefics3Processor
from peft import LoraConfig, PeftModel, get_peft_model
from PIL import Image
from transformers import Idefics3Config


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights large enough to make every token's embedding distinct (norms near one)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if param.ndim == 1 and "norm" in name:
                param.copy_(1 + 0.1 * noise)
            elif param.ndim == 1:
                param.copy_(0.02 * noise)
            else:
                param.copy_(noise / param[0].numel() ** 0.5)


def write_checkpoint(spec: dict) -> None:
    """A random ColIdefics3 saved as colpali-engine saves it, plus an optional adapter."""
    config = Idefics3Config(**spec["config"])
    model = ColIdefics3(config).float().eval()
    randomize(model, spec.get("seed", 0))
    model.save_pretrained(spec["checkpoint"])
    adapter = spec.get("adapter")
    if adapter:
        base = ColIdefics3.from_pretrained(spec["checkpoint"], torch_dtype=torch.float32)
        lora = LoraConfig(
            r=adapter["r"],
            lora_alpha=adapter["alpha"],
            target_modules=adapter["target_modules"],
            init_lora_weights="gaussian",
            use_rslora=adapter.get("use_rslora", False),
        )
        peft_model = get_peft_model(base, lora)
        generator = torch.Generator().manual_seed(adapter.get("seed", 1))
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_B" in name:  # PEFT starts B at zero: make the adapter do something
                    param.copy_(0.2 * torch.randn(param.shape, generator=generator))
        peft_model.save_pretrained(adapter["path"])


def load_model(spec: dict) -> torch.nn.Module:
    model = ColIdefics3.from_pretrained(spec["checkpoint"], torch_dtype=torch.float32).eval()
    if spec.get("adapter"):
        model = PeftModel.from_pretrained(model, spec["adapter"]["path"]).eval()
    return model


def unpadded(embeddings: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [e[m.bool()] for e, m in zip(embeddings, mask)]


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.manual_seed(0)
    write_checkpoint(spec)
    model = load_model(spec)
    # transformers' PIL image backend: the one the project's processor follows (with torchvision
    # installed transformers 5 picks its torchvision backend, whose resizes round differently).
    processor = ColIdefics3Processor.from_pretrained(spec["checkpoint"], backend="pil")
    arrays = {}
    pages, queries = [], []
    if spec.get("images"):
        images = [Image.open(path) for path in spec["images"]]
        batch = processor.process_images(images)
        with torch.no_grad():
            embeddings = model(**batch)
        pages = unpadded(embeddings, batch["attention_mask"])
        arrays.update({f"page_{k}": v.numpy() for k, v in batch.items()})
        arrays["page_embeddings"] = embeddings.numpy()
    if spec.get("queries"):
        batch = processor.process_queries(spec["queries"])
        with torch.no_grad():
            embeddings = model(**batch)
        queries = unpadded(embeddings, batch["attention_mask"])
        arrays.update({f"query_{k}": v.numpy() for k, v in batch.items()})
        arrays["query_embeddings"] = embeddings.numpy()
    if pages and queries:
        arrays["scores"] = processor.score(queries, pages, device="cpu").numpy()
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
