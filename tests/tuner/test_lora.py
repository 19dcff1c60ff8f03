"""LoRA / QLoRA fine-tuning: loss mask, training, resume, adapters, fusing and bad input."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from faults import kill_at
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.lora import LoRALinear
from PIL import Image
from reference import write_checkpoint

from mlx_smolvlm import fuse as fuse_cli
from mlx_smolvlm import generate, load
from mlx_smolvlm import lora as lora_cli
from mlx_smolvlm.lora import run_training
from mlx_smolvlm.processing import Processor
from mlx_smolvlm.processing.image import load_image
from mlx_smolvlm.tuner import trainer
from mlx_smolvlm.tuner.adapters import AdapterError, apply_adapters, select_modules
from mlx_smolvlm.tuner.datasets import (
    TrainingError,
    encode_conversation,
    image_grid,
    load_dataset,
    make_batch,
    warn_upscaled_images,
)
from mlx_smolvlm.tuner.trainer import loss_fn

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 60),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
}
PROMPT = "Describe the image."
ONE_TILE = {"do_image_splitting": False}


def write_jsonl(file: Path, records: list) -> Path:
    file.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return file


def caption_records() -> list[dict]:
    """One record per colour, half in the chat format and half in the question/answer one."""
    records = []
    for i, name in enumerate(COLOURS):
        answer = f"A {name} square."
        if i % 2:
            records.append({"image": f"images/{name}.png", "question": PROMPT, "answer": answer})
            continue
        user = [{"type": "image", "image": f"images/{name}.png"}, {"type": "text", "text": PROMPT}]
        records.append({"messages": [
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]})  # fmt: skip
    return records


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def checkpoint(workdir) -> Path:
    return write_checkpoint(workdir / "tiny")


@pytest.fixture(scope="module")
def quantized_checkpoint(workdir) -> Path:
    return write_checkpoint(workdir / "tiny-4bit", quantize=True)


@pytest.fixture(scope="module")
def processor(checkpoint) -> Processor:
    return Processor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def data(workdir) -> Path:
    """train.jsonl with four solid-colour images and their captions; valid.jsonl with two."""
    root = workdir / "captions"
    (root / "images").mkdir(parents=True)
    for name, rgb in COLOURS.items():
        Image.new("RGB", (32, 32), rgb).save(root / "images" / f"{name}.png")
    write_jsonl(root / "train.jsonl", caption_records())
    write_jsonl(root / "valid.jsonl", caption_records()[:2])
    return root


def train_args(checkpoint: Path, data: Path, adapters: Path, **extra) -> dict:
    """run_training keyword arguments for a quick one-tile run on `data` (a directory or file)."""
    options = {
        "model": str(checkpoint), "data": str(data), "adapter_path": str(adapters),
        "batch_size": 4, "learning_rate": 1e-3, "no_image_splitting": True, "progress": False,
    }  # fmt: skip
    return {**options, **extra}


@pytest.fixture(scope="module")
def trained(checkpoint, data, workdir) -> tuple[Path, list[dict]]:
    """Adapters trained from the command line for 24 steps on the caption data."""
    adapters = workdir / "adapters"
    result = CliRunner().invoke(lora_cli.main, [
        "--model", str(checkpoint), "--data", str(data), "--adapter-path", str(adapters),
        "--iters", "24", "--batch-size", "4", "--learning-rate", "1e-3", "--no-image-splitting",
        "--steps-per-eval", "12", "--save-every", "12", "--seed", "1",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    state = mx.load(str(adapters / trainer.STATE_FILE), return_metadata=True)[1]
    return adapters, json.loads(state["history"])


# ---------------------------------------------------------------------------
# Loss mask


def expected_mask(processor: Processor, ids: list[int], answers: list[str]) -> list[bool]:
    """Assistant tokens found independently: each answer's tokens and <end_of_utterance>,
    right after an "Assistant:" that the text before them ends with."""
    tokenizer = processor.tokenizer
    eou = tokenizer.convert_tokens_to_ids("<end_of_utterance>")
    mask = [False] * len(ids)
    for answer in answers:
        pattern = tokenizer.encode(" " + answer) + [eou]
        starts = [
            k
            for k in range(len(ids))
            if ids[k : k + len(pattern)] == pattern
            and tokenizer.decode(ids[:k], skip_special_tokens=False).endswith("Assistant:")
        ]
        assert len(starts) == 1, answer
        mask[starts[0] : starts[0] + len(pattern)] = [True] * len(pattern)
    return mask


def test_loss_mask_is_exactly_the_assistant_tokens(processor):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Red, mostly."}]},
        {"role": "user", "content": "And the shape?"},
        {"role": "assistant", "content": "A square."},
    ]
    ids, mask = encode_conversation(processor, messages, [(0, 0)])
    assert mask == expected_mask(processor, ids, ["Red, mostly.", "A square."])
    assert ids.count(processor.image_token_id) == 64
    tokens = [
        processor.tokenizer.decode([t], skip_special_tokens=False) for t, m in zip(ids, mask) if m
    ]
    assert "".join(tokens) == " Red, mostly.<end_of_utterance> A square.<end_of_utterance>"
    # The generation prompt ends right where the first answer starts.
    prompt = processor(
        processor.apply_chat_template(messages[:2]), images=[Image.new("RGB", (9, 9))], **ONE_TILE
    )
    assert ids[: prompt["input_ids"].shape[1]] == prompt["input_ids"][0].tolist()
    assert mask.index(True) == prompt["input_ids"].shape[1]


def test_train_on_all_masks_only_image_tokens(processor):
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
        {"role": "assistant", "content": "Hello."},
    ]
    ids, mask = encode_conversation(processor, messages, [(0, 0)], train_on_all=True)
    assert mask == [t != processor.image_token_id for t in ids]


def test_dataset_records_and_batches(processor, data):
    samples = load_dataset(data / "train.jsonl", processor, 512, ONE_TILE)
    assert [s.where for s in samples] == [f"{data / 'train.jsonl'}:{i}" for i in range(1, 5)]
    # Both record shapes give the same tokens for the same content.
    assert samples[0].ids[:5] == samples[1].ids[:5] and samples[1].images[0].name == "green.png"
    batch = make_batch(samples[:2] + samples[:1], processor, ONE_TILE)
    masks = np.zeros(batch.input_ids.shape, bool)
    for row, s in enumerate(samples[:2] + samples[:1]):
        masks[row, : len(s.mask)] = s.mask
    assert np.array_equal(batch.targets, batch.input_ids[:, 1:][masks[:, 1:]])
    assert batch.pixel_values.shape[:2] == (3, 1)


def test_batches_pad_tokens_and_image_tiles(processor, checkpoint, tmp_path):
    Image.new("RGB", (300, 200), (10, 200, 10)).save(tmp_path / "wide.png")
    Image.new("RGB", (40, 90), (200, 10, 10)).save(tmp_path / "tall.png")
    records = [
        {"image": "wide.png", "question": "What?", "answer": "Green."},
        {"image": "tall.png", "question": "What?", "answer": "A red bar."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey."}]},
    ]
    samples = load_dataset(write_jsonl(tmp_path / "mixed.jsonl", records), processor, 4096)
    for sample in samples[:2]:  # the grid read from the header is the processor's
        out = processor.image_processor([[Image.open(sample.images[0])]])
        assert [(out["rows"][0][0], out["cols"][0][0])] == sample.grids
    batch = make_batch(samples, processor)
    tiles = [sum(r * c + 1 if r else 1 for r, c in s.grids) for s in samples]
    assert batch.pixel_values.shape[1] == max(tiles) and tiles[2] == 0
    real = np.abs(batch.pixel_values).reshape(3, batch.pixel_values.shape[1], -1).max(-1) > 0
    assert real.sum(1).tolist() == tiles  # padding tiles are all zero
    assert batch.input_ids[2, len(samples[2].ids) :].tolist() == [
        processor.tokenizer.pad_token_id
    ] * (batch.input_ids.shape[1] - len(samples[2].ids))
    model = load(checkpoint)[0]
    assert np.isfinite(loss_fn(model, batch).item())


# ---------------------------------------------------------------------------
# Training


def test_training_lowers_loss_and_learns_the_captions(trained, checkpoint, data):
    adapters, history = trained
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    assert len(losses) == 24
    assert losses[-1] < 0.2 * losses[0]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    assert [s for s, _ in val] == [0, 12, 24] and val[-1][1] < 0.2 * val[0][1]
    assert (adapters / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    model, processor = load(checkpoint, adapter_path=adapters)
    for name in ("red", "blue"):
        image = str(data / "images" / f"{name}.png")
        out = generate(model, processor, PROMPT, image, max_tokens=8, **ONE_TILE)
        assert out.text.strip() == f"A {name} square."


def test_generate_cli_applies_adapters(trained, checkpoint, data):
    from mlx_smolvlm.generate import main as generate_main

    adapters, _ = trained
    args = ["--model", str(checkpoint), "--adapter-path", str(adapters), "--prompt", PROMPT,
            "--image", str(data / "images" / "green.png"), "--no-image-splitting", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(generate_main, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == "A green square."
    result = CliRunner().invoke(generate_main, [*args[:2], "--adapter-path", str(data)])
    assert result.exit_code != 0 and "adapter_config.json not found" in result.output


def test_adapters_carry_their_base_model_and_image_settings(trained, checkpoint, data, capsys):
    adapters, _ = trained
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["base_model"] == str(checkpoint.resolve())
    assert config["image_kwargs"] == {"do_image_splitting": False}
    model, processor = load(adapter_path=adapters)  # no model: the recorded base
    assert processor.image_processor.do_image_splitting is False
    image = str(data / "images" / "red.png")
    assert generate(model, processor, PROMPT, image, max_tokens=8).text.strip() == "A red square."
    assert "Warning" not in capsys.readouterr().err


def test_a_model_other_than_the_recorded_base_is_reported(trained, checkpoint, tmp_path, capsys):
    adapters, _ = trained
    other = shutil.copytree(checkpoint, tmp_path / "other")
    load(other, adapter_path=adapters)
    err = capsys.readouterr().err
    assert f"trained on {checkpoint.resolve()}" in err and f"--model is {other}" in err
    config = json.loads((adapters / "adapter_config.json").read_text())
    del config["base_model"]
    bare = shutil.copytree(adapters, tmp_path / "bare")
    (bare / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match="records no base_model: pass --model"):
        load(adapter_path=bare)


def test_generate_and_chat_clis_apply_the_adapters_settings(trained, data):
    from mlx_smolvlm.chat import main as chat_main
    from mlx_smolvlm.generate import main as generate_main

    adapters, _ = trained
    image = str(data / "images" / "green.png")
    args = [
        "--adapter-path",
        str(adapters),
        "--prompt",
        PROMPT,
        "--image",
        image,
        "--max-tokens",
        "8",
    ]
    result = CliRunner().invoke(generate_main, args)
    assert result.exit_code == 0, result.output
    assert result.output.strip().startswith("A green square.")
    assert "Prompt: " in result.output
    one_tile = int(result.output.split("Prompt: ")[1].split()[0])
    # A flag still wins: splitting the 32-pixel image (upscaled to 512) gives 17 tiles.
    result = CliRunner().invoke(generate_main, [*args, "--image-splitting"])
    assert result.exit_code == 0, result.output
    assert int(result.output.split("Prompt: ")[1].split()[0]) > one_tile + 16 * 64
    result = CliRunner().invoke(
        chat_main, ["--adapter-path", str(adapters), "--image", image, "--max-tokens", "8"],
        input=f"{PROMPT}\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "A green square." in result.output


def test_fuse_takes_the_base_and_image_settings_from_the_adapters(trained, data, tmp_path):
    adapters, _ = trained
    out = tmp_path / "fused"
    result = CliRunner().invoke(
        fuse_cli.main, ["--adapter-path", str(adapters), "--save-path", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert json.loads((out / "preprocessor_config.json").read_text())["do_image_splitting"] is False
    model, processor = load(out)
    image = str(data / "images" / "blue.png")
    assert generate(model, processor, PROMPT, image, max_tokens=8).text.strip() == "A blue square."


def test_adapter_files_and_loading(trained, checkpoint):
    adapters, _ = trained
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["lora_parameters"] == {"rank": 8, "alpha": 16.0, "scale": 2.0, "dropout": 0.0}
    assert len(config["modules"]) == 14 and not any(
        m.startswith("vision") for m in config["modules"]
    )
    model, _ = load(checkpoint, adapter_path=adapters)
    layer = model.language_model.layers[1].self_attn.q_proj
    assert isinstance(layer, LoRALinear) and not layer.training
    assert not list(adapters.glob(".*"))  # no temporary files left behind


def test_resume_matches_an_uninterrupted_run(checkpoint, data, tmp_path, monkeypatch):
    data = data / "train.jsonl"  # no validation set
    options = {"batch_size": 3, "iters": 6, "save_every": 2, "lora_dropout": 0.2}
    run_training(**train_args(checkpoint, data, tmp_path / "straight", **options))
    real = trainer.batch_indices

    def crash_at_step_5(size, batch_size, seed, step):
        if step == 4:
            raise KeyboardInterrupt
        return real(size, batch_size, seed, step)

    monkeypatch.setattr(trainer, "batch_indices", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_training(**train_args(checkpoint, data, tmp_path / "resumed", **options))
    monkeypatch.undo()
    _, meta = mx.load(str(tmp_path / "resumed" / trainer.STATE_FILE), return_metadata=True)
    assert meta["step"] == "4"
    with pytest.raises(TrainingError, match="--resume"):  # no silent overwrite
        run_training(**train_args(checkpoint, data, tmp_path / "resumed", **options))
    with pytest.raises(TrainingError, match="lora_parameters"):
        run_training(
            **train_args(
                checkpoint, data, tmp_path / "resumed", resume=True, lora_rank=4, **options
            )
        )
    run_training(**train_args(checkpoint, data, tmp_path / "resumed", resume=True, **options))
    straight = mx.load(str(tmp_path / "straight" / trainer.STATE_FILE))
    resumed = mx.load(str(tmp_path / "resumed" / trainer.STATE_FILE))
    assert straight.keys() == resumed.keys()
    assert straight["optimizer.step"].item() == resumed["optimizer.step"].item() == 6
    for key in straight:
        assert np.array_equal(np.array(straight[key]), np.array(resumed[key])), key


def test_module_selection_by_layers_and_names(checkpoint):
    model = load(checkpoint)[0]
    assert len(select_modules(model)) == 14
    last = select_modules(model, num_layers=1, target_modules="self_attn.q_proj, down_proj")
    assert last == [
        "language_model.layers.1.mlp.down_proj",
        "language_model.layers.1.self_attn.q_proj",
    ]
    assert select_modules(model, num_layers=0) == []
    with pytest.raises(ValueError, match=r"\['qkv'\] match no layer; known names: .*'gate_proj'"):
        select_modules(model, target_modules="q_proj,qkv")


def test_grad_checkpoint_gives_the_same_loss_and_gradients(checkpoint, processor, data):
    model = load(checkpoint)[0]
    model.freeze()
    lora_cli.add_lora(model, select_modules(model), lora_cli.lora_parameters(4, 8, 0.0))
    model.update(tree_map(lambda p: p + 0.01, model.trainable_parameters()))
    batch = make_batch(
        load_dataset(data / "train.jsonl", processor, 512, ONE_TILE), processor, ONE_TILE
    )
    value_and_grad = nn.value_and_grad(model, loss_fn)
    plain_loss, plain = value_and_grad(model, batch, False)
    ckpt_loss, ckpt = value_and_grad(model, batch, True)
    assert abs(plain_loss.item() - ckpt_loss.item()) < 1e-6
    for (name, a), (_, b) in zip(tree_flatten(plain), tree_flatten(ckpt)):
        assert np.allclose(a, b, atol=1e-6), name


def test_train_vision_adapts_and_trains_the_vision_tower(checkpoint, processor, data, tmp_path):
    model = load(checkpoint)[0]
    modules = select_modules(model, num_layers=1, target_modules="q_proj,fc1", train_vision=True)
    assert modules == [
        "connector.modality_projection.proj",
        "language_model.layers.1.self_attn.q_proj",
        "vision_model.encoder.layers.0.mlp.fc1",
        "vision_model.encoder.layers.0.self_attn.q_proj",
        "vision_model.encoder.layers.1.mlp.fc1",
        "vision_model.encoder.layers.1.self_attn.q_proj",
    ]
    model.freeze()
    lora_cli.add_lora(model, modules, lora_cli.lora_parameters(4, 8, 0.0))
    batch = make_batch(
        load_dataset(data / "train.jsonl", processor, 512, ONE_TILE), processor, ONE_TILE
    )
    _, grads = nn.value_and_grad(model, loss_fn)(model, batch)
    for name, grad in tree_flatten(grads):
        if name.endswith("lora_b"):
            assert np.abs(np.array(grad)).max() > 0, name
    history = run_training(**train_args(checkpoint, data, tmp_path, epochs=2, train_vision=True))
    assert [h["step"] for h in history if "train_loss" in h] == [1, 2]  # 4 records, batch 4
    saved = mx.load(str(tmp_path / "adapters.safetensors"))
    vision_b = [
        v
        for k, v in saved.items()
        if k.startswith(("vision", "connector")) and k.endswith("lora_b")
    ]
    assert len(vision_b) == 13 and all(np.abs(np.array(v)).max() > 0 for v in vision_b)
    fused = fuse_cli.fuse(checkpoint, tmp_path, tmp_path / "fused")
    assert fused_logits_gap(checkpoint, tmp_path, fused, processor, data) <= 2e-6


def test_qlora_trains_on_a_quantized_model(quantized_checkpoint, data, tmp_path):
    history = run_training(
        **train_args(quantized_checkpoint, data, tmp_path / "q", iters=12, val_batches=0)
    )
    losses = [h["train_loss"] for h in history if "train_loss" in h]
    assert losses[-1] < 0.5 * losses[0]
    model, _ = load(quantized_checkpoint, adapter_path=tmp_path / "q")
    layer = model.language_model.layers[0].mlp.down_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.linear, nn.QuantizedLinear)


# ---------------------------------------------------------------------------
# Fusing


def fused_logits_gap(
    base: Path, adapters: Path, fused: Path, processor: Processor, data: Path
) -> float:
    samples = load_dataset(data / "train.jsonl", processor, 512, ONE_TILE)
    batch = make_batch(samples, processor, ONE_TILE)
    inputs = (batch.input_ids, batch.pixel_values, batch.pixel_attention_mask)
    with_adapters = load(base, adapter_path=adapters)[0](*inputs)
    merged = load(fused)[0](*inputs)
    # Relative to the logits' size: W + s * B @ A rounds in float32 (logits of ~18 differ by
    # ~2e-5, ~1e-6 of their size, depending on the trained adapters).
    return float(mx.abs(with_adapters - merged).max() / mx.abs(merged).max())


def test_fused_model_equals_base_plus_adapters(trained, checkpoint, processor, data, workdir):
    adapters, _ = trained
    fused = workdir / "fused"
    args = ["--model", str(checkpoint), "--adapter-path", str(adapters), "--save-path", str(fused)]
    result = CliRunner().invoke(fuse_cli.main, args)
    assert result.exit_code == 0, result.output
    assert fused_logits_gap(checkpoint, adapters, fused, processor, data) <= 2e-6
    assert (fused / "tokenizer.json").exists() and (fused / "preprocessor_config.json").exists()
    assert not any(k.endswith("lora_a") for k in mx.load(str(fused / "model.safetensors")))
    result = CliRunner().invoke(fuse_cli.main, args)  # an existing output is not replaced silently
    assert result.exit_code != 0 and "--force" in result.output


def listing(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.parametrize("pause", ["staged", "swapped"])
def test_sigkilled_fuse_leaves_old_or_new_model(trained, checkpoint, tmp_path, pause):
    adapters, _ = trained
    target = tmp_path / "fused"
    shutil.copytree(checkpoint, target)  # an old model at the target
    old = listing(target)
    args = ["--model", str(checkpoint), "--adapter-path", str(adapters)]
    kill_at(pause, ["-m", "mlx_smolvlm.fuse", *args, "--save-path", str(target), "--force"])
    assert any(p.name.startswith(".fused.") for p in tmp_path.iterdir())  # what the kill left
    reference = fuse_cli.fuse(checkpoint, adapters, tmp_path / "reference")
    assert listing(target) == (listing(reference) if pause == "swapped" else old)
    fuse_cli.fuse(checkpoint, adapters, target, force=True)  # the next run cleans up
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fused", "reference"]
    assert target.stat().st_mode & 0o777 == 0o755


def test_fuse_disk_full_is_one_line_and_leaves_nothing(trained, checkpoint, tmp_path, monkeypatch):
    adapters, _ = trained

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full)
    target = tmp_path / "fused"
    args = ["--model", str(checkpoint), "--adapter-path", str(adapters), "--save-path", str(target)]
    result = CliRunner().invoke(fuse_cli.main, args)
    assert result.exit_code == 1 and "No space left on device" in result.output
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_fuse_refuses_a_folder_that_is_not_a_model(trained, checkpoint, tmp_path):
    adapters, _ = trained
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "sub").mkdir()
    args = ["--model", str(checkpoint), "--adapter-path", str(adapters), "--force"]
    result = CliRunner().invoke(fuse_cli.main, [*args, "--save-path", str(tmp_path)])
    assert result.exit_code == 1 and "not a model's" in result.output
    result = CliRunner().invoke(fuse_cli.main, [*args, "--save-path", str(checkpoint.parent)])
    assert result.exit_code == 1 and "source checkpoint" in result.output
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_fused_quantized_model_with_dequantize(quantized_checkpoint, processor, data, tmp_path):
    run_training(**train_args(quantized_checkpoint, data, tmp_path / "q", iters=3, val_batches=0))
    fused = fuse_cli.fuse(quantized_checkpoint, tmp_path / "q", tmp_path / "fused", dequantize=True)
    assert "quantization" not in json.loads((fused / "config.json").read_text())
    assert fused_logits_gap(quantized_checkpoint, tmp_path / "q", fused, processor, data) <= 2e-6
    requantized = fuse_cli.fuse(quantized_checkpoint, tmp_path / "q", tmp_path / "fused-4bit")
    model = load(requantized)[0]
    assert isinstance(model.language_model.layers[0].self_attn.q_proj, nn.QuantizedLinear)


# ---------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    "lines, message",
    [
        (
            ['{"image": "images/red.png", "question": "Q", "answer": "A"}', "{not json"],
            r"bad.jsonl:2: invalid JSON",
        ),
        (
            ['{"image": "images/nope.png", "question": "Q", "answer": "A"}'],
            r"bad.jsonl:1: image 'images/nope.png' not found",
        ),
        (["", "  "], r"bad.jsonl is empty"),
        (
            ['{"messages": [{"role": "user", "content": "Q"}]}'],
            r"bad.jsonl:1: no assistant message",
        ),
        (['{"text": "hello"}'], r"bad.jsonl:1: a record needs 'messages'"),
        (
            ['{"image": "images/red.png", "question": "' + "word " * 60 + '", "answer": "A"}'],
            r"bad.jsonl:1: \d+ tokens, more than --max-seq-length 128",
        ),
    ],
    ids=["malformed-json", "missing-image", "empty", "no-assistant", "unknown-shape", "too-long"],
)
def test_bad_records_fail_before_training_with_file_and_line(processor, data, lines, message):
    file = data / "bad.jsonl"
    write_jsonl(file, lines)
    with pytest.raises(TrainingError, match=message):
        load_dataset(file, processor, 128, ONE_TILE)


def test_cli_reports_bad_data_clearly(checkpoint, data, tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"image": "gone.png", "prompt": "Q", "completion": "A"}])
    runner = CliRunner()
    result = runner.invoke(lora_cli.main, ["--model", str(checkpoint), "--data", str(tmp_path)])
    assert result.exit_code != 0 and "train.jsonl:1: image 'gone.png' not found" in result.output
    result = runner.invoke(
        lora_cli.main, ["--model", str(checkpoint), "--data", str(tmp_path / "none")]
    )
    assert result.exit_code != 0 and "does not exist" in result.output
    result = runner.invoke(
        lora_cli.main,
        ["--model", str(checkpoint), "--data", str(data), "--iters", "2", "--epochs", "1"],
    )
    assert result.exit_code != 0 and "not both" in result.output


def test_image_grid_reads_rotated_headers(processor, tmp_path):
    image = Image.new("RGB", (400, 100))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90: the upright image is 100 wide and 400 tall
    image.save(tmp_path / "rotated.jpg", exif=exif)
    out = processor.image_processor([[load_image(tmp_path / "rotated.jpg")]])
    assert image_grid(processor.image_processor, tmp_path / "rotated.jpg", {}) == (
        out["rows"][0][0],
        out["cols"][0][0],
    )


def test_apply_adapters_errors_name_the_file(trained, checkpoint, tmp_path):
    adapters, _ = trained
    model = load(checkpoint)[0]
    with pytest.raises(AdapterError, match="does not exist"):
        apply_adapters(model, tmp_path / "missing")
    bad = tmp_path / "bad"
    shutil.copytree(adapters, bad)
    (bad / "adapter_config.json").write_text("{")
    with pytest.raises(AdapterError, match=r"bad/adapter_config.json: invalid JSON"):
        apply_adapters(load(checkpoint)[0], bad)
    config = json.loads((adapters / "adapter_config.json").read_text())
    config["lora_parameters"]["rank"] = 4
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"bad/adapters.safetensors: .* has shape"):
        apply_adapters(load(checkpoint)[0], bad)
    config["modules"] = config["modules"][:-1]
    config["lora_parameters"]["rank"] = 8
    (bad / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(AdapterError, match=r"bad/adapters.safetensors does not fit"):
        apply_adapters(load(checkpoint)[0], bad)
    (bad / "adapters.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"bad/adapters.safetensors not found"):
        apply_adapters(load(checkpoint)[0], bad)


def test_cli_help_documents_every_flag():
    out = CliRunner().invoke(lora_cli.main, ["--help"]).output
    for flag in ("--model", "--data", "--iters", "--epochs", "--batch-size", "--learning-rate",
                 "--lora-rank", "--lora-alpha", "--lora-dropout", "--lora-layers", "--target-modules",
                 "--train-vision", "--grad-checkpoint", "--max-seq-length", "--save-every", "--resume",
                 "--adapter-path", "--seed", "--steps-per-eval", "--val-batches", "--train-on-all"):  # fmt: skip
        assert flag in out
    out = CliRunner().invoke(fuse_cli.main, ["--help"]).output
    for flag in ("--model", "--adapter-path", "--save-path", "--dequantize"):
        assert flag in out


def test_example_script_runs(checkpoint, tmp_path):
    import importlib.util

    file = Path(__file__).resolve().parents[2] / "examples" / "finetune_captions.py"
    spec = importlib.util.spec_from_file_location("finetune_captions", file)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = ["--model", str(checkpoint), "--out", str(tmp_path), "--iters", "2"]
    result = CliRunner().invoke(example.main, args)
    assert result.exit_code == 0, result.output
    assert "training loss" in result.output and result.output.count("expected") == 8


def test_warning_when_small_images_are_upscaled_into_many_tiles(processor, data, capsys):
    split = load_dataset(data / "train.jsonl", processor, 4096)
    warn_upscaled_images(split, processor)
    err = capsys.readouterr().err
    assert err.startswith("Warning: 4 of 4 records are mostly image tokens")
    assert "32x32) are upscaled into 17 tiles" in err and "--no-image-splitting" in err
    one_tile = load_dataset(data / "train.jsonl", processor, 4096, ONE_TILE)
    warn_upscaled_images(one_tile, processor)
    assert capsys.readouterr().err == ""


def test_server_cli_applies_the_adapters(trained, checkpoint, monkeypatch):
    from mlx_smolvlm import server

    adapters, _ = trained
    started = {}

    class Stopped:
        server_address = ("127.0.0.1", 0)

        def serve_forever(self):
            raise KeyboardInterrupt  # as if the operator pressed Ctrl-C at once

        def server_close(self):
            pass

    def fake_create_server(vlm, processor, model_id, *args):
        started.update(vlm=vlm, processor=processor, model_id=model_id)
        return Stopped()

    monkeypatch.setattr(server, "create_server", fake_create_server)
    result = CliRunner().invoke(server.main, ["--adapter-path", str(adapters), "--port", "0"])
    assert result.exit_code == 0, result.output
    assert started["model_id"] == checkpoint.name  # the recorded base, by its folder name
    assert started["processor"].image_processor.do_image_splitting is False
    layer = started["vlm"].language_model.layers[0].self_attn.q_proj
    assert isinstance(layer, LoRALinear)
    result = CliRunner().invoke(server.main, ["--adapter-path", str(checkpoint)])
    assert result.exit_code == 1 and "adapter_config.json not found" in result.output
