"""colpali-engine's ColIdefics3 (torch) on random weights, run in a separate Python.

colpali-engine needs torchvision (which does not import beside the test environment's
torch), so tests/retrieval/test_retrieval.py runs this script with $SMOLVLM_COLPALI_REF_PYTHON (an
environment that .ci/run builds):

    python colpali_reference.py SPEC.json OUT.npz

SPEC.json: {"config": config.json dict, "checkpoint": folder to write the random
ColIdefics3 to (tokenizer/processor files already there), "seed", "adapter": null or
{"path", "r", "alpha", "target_modules", "seed"} (a PEFT LoRA adapter on that checkpoint,
as the colSmol releases are), "images": [image paths], "queries": [strings]}.

OUT.npz gets the processor's page_* and query_* inputs (input_ids, attention_mask, and the
pages' pixel_values, pixel_attention_mask) and, for each model ("base", and "adapter" when
there is one), {model}_page_embeddings and {model}_query_embeddings (padded, as returned) and
{model}_scores = processor.score(queries, pages) of the unpadded embeddings (which
pads the pages of a batch with zero vectors to the longest) and {model}_scores_per_page,
the same called for one page at a time (no padding).
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


def load_models(spec: dict) -> dict[str, torch.nn.Module]:
    """The checkpoint as saved, and with its adapter applied (unmerged) when there is one."""
    base = ColIdefics3.from_pretrained(spec["checkpoint"], torch_dtype=torch.float32).eval()
    models = {"base": base}
    if spec.get("adapter"):
        adapted = ColIdefics3.from_pretrained(spec["checkpoint"], torch_dtype=torch.float32)
        models["adapter"] = PeftModel.from_pretrained(adapted, spec["adapter"]["path"]).eval()
    return models


def unpadded(embeddings: torch.Tensor, mask: torch.Tensor) -> list[torch.Tensor]:
    return [e[m.bool()] for e, m in zip(embeddings, mask)]


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    torch.manual_seed(0)
    write_checkpoint(spec)
    models = load_models(spec)
    # transformers' PIL image backend: the one the project's processor follows (with torchvision
    # installed transformers 5 picks its torchvision backend, whose resizes round differently).
    processor = ColIdefics3Processor.from_pretrained(spec["checkpoint"], backend="pil")
    images = [Image.open(path) for path in spec["images"]]
    inputs = {
        "page": processor.process_images(images),
        "query": processor.process_queries(spec["queries"]),
    }
    arrays = {f"{kind}_{k}": v.numpy() for kind, batch in inputs.items() for k, v in batch.items()}
    for name, model in models.items():
        vectors = {}
        for kind, batch in inputs.items():
            with torch.no_grad():
                embeddings = model(**batch)
            arrays[f"{name}_{kind}_embeddings"] = embeddings.numpy()
            vectors[kind] = unpadded(embeddings, batch["attention_mask"])
        arrays[f"{name}_scores"] = processor.score(
            vectors["query"], vectors["page"], device="cpu"
        ).numpy()
        # One page at a time: no other page's length pads it with zero vectors.
        arrays[f"{name}_scores_per_page"] = torch.cat(
            [processor.score(vectors["query"], [page], device="cpu") for page in vectors["page"]],
            dim=1,
        ).numpy()
    np.savez(out, **arrays)


if __name__ == "__main__":
    main()
