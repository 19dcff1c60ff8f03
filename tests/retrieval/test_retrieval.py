"""ColSmolVLM retrieval: parity with colpali-engine, MaxSim, the index format and the retrieve CLI.

colpali-engine (the reference) runs in a second Python given by $SMOLVLM_COLPALI_REF_PYTHON
(tests/retrieval/colpali_reference.py); .ci/run builds that environment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import real_model_dir
from mlx.utils import tree_flatten
from PIL import Image
from reference import copy_tokenizer_files, tiny_config_for_real_tokenizer

from mlx_smolvlm import Model, ModelConfig
from mlx_smolvlm.retrieval import (
    ColIdefics3,
    Index,
    IndexFormatError,
    IndexWriter,
    Page,
    RetrievalProcessor,
    convert_retriever,
    embed_images,
    embed_queries,
    fuse_adapter,
    load_retriever,
    score,
)
from mlx_smolvlm.retrieval.embedding import embed_inputs
from mlx_smolvlm.retrieval.index import MANIFEST, memmap_tensor
from mlx_smolvlm.retrieve import main as retrieve_main

REPO = Path(__file__).resolve().parents[2]
REF_PYTHON = os.environ.get("SMOLVLM_COLPALI_REF_PYTHON")
# colpali-engine's released adapters target the decoder's projections and the retrieval head.
TARGET_MODULES = (
    "(.*(model.text_model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$"
    "|.*(linear).*$)"
)
QUERIES = ["What is the revenue in 2023?", "red", "Quelle est la température à Zürich ?"]


def retriever_files(folder: Path, splitting: bool = True) -> Path:
    """Tokenizer and processor files of SmolVLM-256M, with pages of at most 1024 px (5 tiles)."""
    folder.mkdir(parents=True, exist_ok=True)
    copy_tokenizer_files(real_model_dir("SmolVLM-256M-Instruct"), folder)
    file = folder / "preprocessor_config.json"
    settings = json.loads(file.read_text())
    settings.update(size={"longest_edge": 1024}, do_image_splitting=splitting)
    file.write_text(json.dumps(settings))
    return folder


# ---------------------------------------------------------------------------
# Parity with colpali-engine


@pytest.fixture(scope="module")
def colpali(tmp_path_factory) -> dict:
    """Random ColIdefics3 + LoRA adapter written by colpali-engine/PEFT, and its outputs."""
    if not REF_PYTHON:
        pytest.skip(  # a failure under CI (conftest.REQUIRED_IN_CI)
            "SMOLVLM_COLPALI_REF_PYTHON is not set: build the colpali-engine environment as "
            ".ci/run does and point the variable at its python"
        )
    root = tmp_path_factory.mktemp("colpali")
    checkpoint = retriever_files(root / "checkpoint")
    rng = np.random.default_rng(0)
    images = []
    for i, (size, mode) in enumerate(
        [((300, 200), "RGB"), ((120, 260), "RGBA"), ((300, 200), "L")]
    ):
        channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
        path = root / f"page{i}.png"
        Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
        images.append(str(path))
    spec = {
        "config": tiny_config_for_real_tokenizer(),
        "checkpoint": str(checkpoint),
        "seed": 0,
        "adapter": {
            "path": str(root / "adapter"),
            "r": 4,
            "alpha": 8,
            "target_modules": TARGET_MODULES,
        },
        "images": images,
        "queries": QUERIES,
    }
    (root / "spec.json").write_text(json.dumps(spec))
    out = root / "reference.npz"
    run = subprocess.run(
        [
            REF_PYTHON,
            str(Path(__file__).with_name("colpali_reference.py")),
            str(root / "spec.json"),
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return {"root": root, "spec": spec, "ref": dict(np.load(out))}


def test_processor_ids_and_pixels_match_colpali(colpali):
    processor = RetrievalProcessor.from_pretrained(colpali["spec"]["checkpoint"])
    ref = colpali["ref"]
    pages = processor.process_images(colpali["spec"]["images"])
    queries = processor.process_queries(QUERIES)
    for key in ("input_ids", "attention_mask", "pixel_values", "pixel_attention_mask"):
        np.testing.assert_array_equal(pages[key], ref[f"page_{key}"], err_msg=key)
    for key in ("input_ids", "attention_mask"):
        np.testing.assert_array_equal(queries[key], ref[f"query_{key}"], err_msg=key)
    assert not pages["attention_mask"].all()  # pages of different sizes were padded (left)


def _check_parity(model, processor, ref: dict, prefix: str, spec: dict) -> None:
    """Padded embeddings within 1e-4, MaxSim scores within 1e-3 and in the same order."""
    pages = processor.process_images(spec["images"])
    queries = processor.process_queries(QUERIES)
    page_out = np.array(model(**pages))
    query_out = np.array(model(**queries))
    np.testing.assert_allclose(page_out, ref[f"{prefix}_page_embeddings"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(query_out, ref[f"{prefix}_query_embeddings"], atol=1e-4, rtol=0)
    page_vectors = [np.array(p) for p in embed_inputs(model, pages)]
    query_vectors = embed_inputs(model, queries)
    # Sums of about twenty dot products of vectors each within 1e-4.
    ours = score(query_vectors, page_vectors)
    expected = ref[f"{prefix}_scores_per_page"]
    np.testing.assert_allclose(ours, expected, atol=1e-3, rtol=0)
    np.testing.assert_array_equal(
        np.argsort(-ours, axis=1, kind="stable"), np.argsort(-expected, axis=1, kind="stable")
    )
    # colpali-engine's batched score pads shorter pages with zero vectors, which compete in the
    # max: the same pages padded so give its scores.
    longest = max(len(p) for p in page_vectors)
    padded = [np.pad(p, ((0, longest - len(p)), (0, 0))) for p in page_vectors]
    np.testing.assert_allclose(
        score(query_vectors, padded), ref[f"{prefix}_scores"], atol=1e-3, rtol=0
    )


def test_full_checkpoint_matches_colpali(colpali):
    model, processor = load_retriever(colpali["spec"]["checkpoint"])
    assert model.dim == 128 and "lm_head" not in str(tree_flatten(model.parameters()))
    _check_parity(model, processor, colpali["ref"], "base", colpali["spec"])


def test_peft_adapter_matches_colpali_unfused_and_fused(colpali):
    # The released form: an adapter folder naming its base checkpoint.
    model, processor = load_retriever(colpali["spec"]["adapter"]["path"])
    _check_parity(model, processor, colpali["ref"], "adapter", colpali["spec"])
    fuse_adapter(model)
    assert "lora" not in str(tree_flatten(model.parameters()))
    _check_parity(model, processor, colpali["ref"], "adapter", colpali["spec"])
    # ... and an adapter passed beside a full checkpoint.
    model, _ = load_retriever(
        colpali["spec"]["checkpoint"], adapter_path=colpali["spec"]["adapter"]["path"], fuse=True
    )
    _check_parity(model, processor, colpali["ref"], "adapter", colpali["spec"])


def test_convert_adapter_to_mlx_float_and_quantized(colpali, tmp_path):
    adapter = colpali["spec"]["adapter"]["path"]
    out = convert_retriever(adapter, tmp_path / "mlx", dtype="float32")
    assert not (out / "adapter_config.json").exists() and (out / "tokenizer.json").exists()
    model, processor = load_retriever(out)
    _check_parity(model, processor, colpali["ref"], "adapter", colpali["spec"])

    # 8 bits: 4-bit weights of a tiny random model lose too much to compare against.
    quantized = convert_retriever(
        adapter, tmp_path / "q8", quantize=True, q_bits=8, q_group_size=32
    )
    config = json.loads((quantized / "config.json").read_text())
    assert config["quantization"]["bits"] == 8
    model, processor = load_retriever(quantized)
    assert "linear.scales" in dict(tree_flatten(model.parameters()))
    queries = embed_queries(model, processor, QUERIES)
    reference = colpali["ref"]["adapter_query_embeddings"]
    mask = colpali["ref"]["query_attention_mask"].astype(bool)
    for i, query in enumerate(queries):
        cosine = (np.array(query) * reference[i][mask[i]]).sum(-1)
        assert cosine.min() > 0.95, cosine  # quantized weights: close, not equal

    result = _cli("convert", "--model", adapter, "--mlx-path", str(tmp_path / "mlx"))
    assert result.exit_code == 1 and "pass --force" in result.stderr
    result = _cli("convert", "--model", adapter, "--mlx-path", str(tmp_path / "mlx"), "--force")
    assert result.exit_code == 0 and (tmp_path / "mlx" / "model.safetensors").exists()
    with pytest.raises(ValueError, match="source checkpoint"):
        convert_retriever(colpali["spec"]["checkpoint"], colpali["spec"]["checkpoint"], force=True)
    assert (Path(colpali["spec"]["checkpoint"]) / "model.safetensors").exists()


def test_bad_adapters_are_refused_with_the_file_named(colpali, tmp_path):
    source = Path(colpali["spec"]["adapter"]["path"])
    config = json.loads((source / "adapter_config.json").read_text())
    cases = {
        "dora": ({**config, "use_dora": True}, "use_dora"),
        "prefix": ({**config, "peft_type": "PREFIX_TUNING"}, "not LORA"),
        "rank": ({**config, "r": 0}, "r must be a positive number"),
        "nobase": ({**config, "base_model_name_or_path": None}, "base_model_name_or_path"),
    }
    for name, (settings, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text(json.dumps(settings))
        (folder / "adapter_model.safetensors").write_bytes(
            (source / "adapter_model.safetensors").read_bytes()
        )
        with pytest.raises(ValueError, match=message):
            load_retriever(folder)
    truncated = tmp_path / "truncated"
    truncated.mkdir()
    (truncated / "adapter_config.json").write_text(json.dumps(config))
    (truncated / "adapter_model.safetensors").write_bytes(
        (source / "adapter_model.safetensors").read_bytes()[:100]
    )
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        load_retriever(truncated)


# ---------------------------------------------------------------------------
# MaxSim and the index format


def _random_embeddings(rng, count: int, lengths=(3, 40), dim: int = 16) -> list[np.ndarray]:
    out = []
    for _ in range(count):
        x = rng.standard_normal((int(rng.integers(*lengths)), dim)).astype(np.float32)
        out.append(x / np.linalg.norm(x, axis=-1, keepdims=True))
    return out


def _numpy_maxsim(queries, pages) -> np.ndarray:
    return np.array([[(q @ p.T).max(axis=1).sum() for p in pages] for q in queries])


def test_score_is_maxsim_over_real_tokens_in_any_batching():
    rng = np.random.default_rng(1)
    queries, pages = _random_embeddings(rng, 4), _random_embeddings(rng, 11)
    expected = _numpy_maxsim(queries, pages)
    for batch_size in (1, 3, 128):
        np.testing.assert_allclose(
            score(queries, pages, batch_size=batch_size), expected, atol=1e-5
        )
    np.testing.assert_allclose(score(queries, [mx.array(p) for p in pages]), expected, atol=1e-5)
    with pytest.raises(ValueError, match="dimension"):
        score(queries, [np.ones((2, 8), np.float32)])
    with pytest.raises(ValueError, match=r"item 0 has shape \(0, 16\)"):
        score(queries, [np.zeros((0, 16), np.float32)])


def test_index_round_trip_memory_mapped_and_equal_to_score(tmp_path):
    rng = np.random.default_rng(2)
    pages = _random_embeddings(rng, 23)
    identity = {"model": "m", "adapter": None, "dim": 16, "dtype": "float32", "dpi": 144}
    writer = IndexWriter(tmp_path / "idx", identity, shard_pages=5)
    for i, page in enumerate(pages):
        writer.add(Page(f"/docs/{i // 10}.pdf", i % 10 + 1), page)
    writer.flush()
    index = Index(tmp_path / "idx")
    assert len(index) == 23 and len(index.shards) == 5
    assert all(isinstance(matrix, np.memmap) for matrix, *_ in index.shards)
    queries = _random_embeddings(rng, 3)
    expected = _numpy_maxsim(queries, pages)
    for chunk in (1, 50, 1 << 16):  # chunks of one page, of a few pages, of whole shards
        np.testing.assert_allclose(index.scores(queries, chunk_tokens=chunk), expected, atol=1e-5)
    hits = index.search(queries, k=4)
    for row, query_hits in zip(expected, hits):
        assert [hit.id for hit in query_hits] == list(np.argsort(-row, kind="stable")[:4])
        assert [hit.rank for hit in query_hits] == [1, 2, 3, 4]
    assert hits[0][0].source.startswith("/docs/") and hits[0][0].page >= 1
    lines = (tmp_path / "idx" / MANIFEST).read_text().splitlines()
    assert json.loads(lines[12]) == {
        "id": 12, "source": "/docs/1.pdf", "page": 3,
        "shard": "embeddings-00002.safetensors", "start": sum(len(p) for p in pages[10:12]),
        "tokens": len(pages[12]),
    }  # fmt: skip
    np.testing.assert_array_equal(
        memmap_tensor(tmp_path / "idx" / "embeddings-00002.safetensors")[: len(pages[10])],
        pages[10],
    )


def test_index_writer_recovers_from_a_killed_write(tmp_path):
    rng = np.random.default_rng(3)
    pages = _random_embeddings(rng, 6)
    identity = {"model": "m", "adapter": None, "dim": 16, "dtype": "float16", "dpi": 144}
    writer = IndexWriter(tmp_path, identity, shard_pages=2)
    for i, page in enumerate(pages[:4]):
        writer.add(Page(f"/p{i}.png"), page)
    # A kill after a shard's rename (no lines yet), and one in the middle of a manifest line.
    (tmp_path / "embeddings-00007.safetensors").write_bytes(b"orphan")
    (tmp_path / ".embeddings-00008.safetensors.tmp").write_bytes(b"half")
    with open(tmp_path / MANIFEST, "a") as f:
        f.write('{"id": 4, "source": "/p4.png", "pa')
    resumed = IndexWriter(tmp_path, identity, shard_pages=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "embeddings-00000.safetensors", "embeddings-00001.safetensors", "index.json", MANIFEST,
    ]  # fmt: skip
    assert resumed.done == {(f"/p{i}.png", None) for i in range(4)}
    for i, page in enumerate(pages):
        resumed.add(Page(f"/p{i}.png"), page)  # the first four are already there
    resumed.flush()
    index = Index(tmp_path)
    assert [e["source"] for e in index.entries] == [f"/p{i}.png" for i in range(6)]
    np.testing.assert_allclose(
        index.scores(pages[:1]), _numpy_maxsim(pages[:1], pages), atol=5e-3
    )  # float16 storage

    other = {**identity, "model": "another"}
    with pytest.raises(IndexFormatError, match="model='m'"):
        IndexWriter(tmp_path, other)
    (tmp_path / MANIFEST).write_text("not json\n")
    with pytest.raises(IndexFormatError, match=f"{MANIFEST}:1: bad manifest line"):
        Index(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "notes.txt").write_text("mine")
    with pytest.raises(IndexFormatError, match="non-empty folder that is not an index"):
        IndexWriter(tmp_path / "elsewhere", identity)
    assert (tmp_path / "elsewhere" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------
# End to end: a retriever whose weights make the matching page win

COLORS = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "yellow": (255, 255, 0)}


def planted_checkpoint(folder: Path) -> Path:
    """A tiny retriever where a colour word's query token equals that colour's image tokens.

    Decoder layers add nothing (zero o_proj and down_proj), so each token's output depends
    on its input embedding alone; without position embeddings every patch of a one-colour
    page is the same, so all its image tokens are one vector. The word's embedding row is set
    to that vector: its query token scores 1 on that colour's page and less on the others,
    and the query's augmentation tokens (<end_of_utterance>, also in every page's prompt)
    score 1 everywhere.
    """
    retriever_files(folder, splitting=False)
    config = tiny_config_for_real_tokenizer()
    (folder / "config.json").write_text(json.dumps(config))
    mx.random.seed(0)
    model = ColIdefics3(ModelConfig.from_dict(config))
    position = model.model.vision_model.embeddings.position_embedding
    position.weight = mx.zeros_like(position.weight)
    for layer in model.model.language_model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
    processor = RetrievalProcessor.from_pretrained(folder)
    table = np.array(model.model.language_model.embed_tokens.weight)
    for word, rgb in COLORS.items():
        tile = processor.process_images([Image.new("RGB", (64, 64), rgb)])
        features = model.model.get_image_features(
            tile["pixel_values"], tile["pixel_attention_mask"]
        )
        (token,) = processor.tokenizer.encode(word)
        table[token] = np.array(features[0])
    model.model.language_model.embed_tokens.weight = mx.array(table)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return folder


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("planted")
    checkpoint = planted_checkpoint(root / "model")
    pages = [Image.new("RGB", (200, 200), COLORS[c]) for c in ("red", "green", "blue")]
    pages[0].save(root / "doc.pdf", save_all=True, append_images=pages[1:])
    (root / "folder" / "sub").mkdir(parents=True)
    Image.new("RGB", (120, 90), COLORS["yellow"]).save(root / "folder" / "sub" / "yellow.png")
    Image.new("RGB", (90, 120), (255, 255, 255)).save(root / "white.jpg")
    return {"root": root, "model": checkpoint}


def test_python_api_finds_the_planted_page(planted):
    model, processor = load_retriever(planted["model"])
    pages = embed_images(
        model, processor, [Image.new("RGB", (80, 80), rgb) for rgb in COLORS.values()], batch_size=3
    )
    queries = embed_queries(model, processor, list(COLORS))
    scores = score(queries, pages)
    np.testing.assert_array_equal(scores.argmax(axis=1), np.arange(len(COLORS)))
    np.testing.assert_allclose(np.diag(scores), 11.0, atol=1e-3)  # 1 word + 10 augmentation tokens


def smolvlm_checkpoint(folder: Path) -> Path:
    """A tiny random SmolVLM (a generator, not a retriever) with the real tokenizer."""
    folder.mkdir()
    copy_tokenizer_files(real_model_dir("SmolVLM-256M-Instruct"), folder)
    config = tiny_config_for_real_tokenizer()
    (folder / "config.json").write_text(json.dumps(config))
    model = Model(ModelConfig.from_dict(config))
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return folder


def _cli(*args: str):
    return CliRunner().invoke(retrieve_main, list(args), catch_exceptions=False)


def test_cli_index_and_search_a_pdf_images_and_a_folder(planted, tmp_path):
    root, index = planted["root"], tmp_path / "index"
    inputs = [str(root / "doc.pdf"), str(root / "folder"), str(root / "white.jpg")]
    result = _cli(
        "index", *inputs, "--index", str(index), "--model", str(planted["model"]), "--quiet"
    )
    assert result.exit_code == 0, result.output
    assert "5 pages indexed" in result.output
    result = _cli("search", str(index), "green", "yellow", "--top-k", "3", "--json")
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert [r["query"] for r in found] == ["green", "yellow"]
    assert (found[0]["results"][0]["source"], found[0]["results"][0]["page"]) == (
        str((root / "doc.pdf").resolve()), 2,
    )  # fmt: skip
    assert found[1]["results"][0]["source"].endswith("yellow.png")
    assert found[1]["results"][0]["page"] is None
    assert [r["rank"] for r in found[0]["results"]] == [1, 2, 3]
    assert found[0]["results"][0]["score"] > found[0]["results"][1]["score"]
    result = _cli("search", str(index), "blue")
    assert result.exit_code == 0
    assert result.stdout.splitlines()[1].endswith("doc.pdf page 3")
    # A rerun over the same inputs adds nothing.
    manifest = (index / MANIFEST).read_text()
    result = _cli("index", *inputs, "--index", str(index), "--quiet")
    assert result.exit_code == 0 and (index / MANIFEST).read_text() == manifest


def test_cli_bad_inputs_are_one_line_errors(planted, tmp_path):
    root, model = planted["root"], str(planted["model"])
    (tmp_path / "notes.txt").write_text("text")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage")
    (tmp_path / "empty").mkdir()
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep.txt").write_text("mine")
    index = str(tmp_path / "index")
    cases = [
        (["index", str(tmp_path / "missing.pdf"), "--index", index], "missing.pdf: no such file"),
        (["index", str(tmp_path / "notes.txt"), "--index", index], "notes.txt: not a PDF or an image"),
        (["index", str(tmp_path / "broken.pdf"), "--index", index], "broken.pdf: not a readable PDF"),
        (["index", str(tmp_path / "empty"), "--index", index], "holds no PDF or image files"),
        (["index", str(root / "white.jpg"), "--index", str(tmp_path / "occupied"), "--model", model],
         "not an index"),
        (["index", str(tmp_path / "broken.png"), "--index", index, "--model", model], "broken.png"),
        (["index", str(root / "white.jpg"), "--index", index, "--model", str(tmp_path)],
         "config.json"),
        (["index", str(root / "white.jpg"), "--index", str(tmp_path / "i2"), "--model",
          str(smolvlm_checkpoint(tmp_path / "smolvlm"))], "no linear.weight"),
        (["search", str(tmp_path / "empty"), "query"], "not an index"),
        (["search", str(tmp_path / "nowhere"), "query"], "no such index folder"),
    ]  # fmt: skip
    for args, message in cases:
        args = args + ["--quiet"] if args[0] == "index" else args  # no progress bar on stderr
        result = CliRunner().invoke(retrieve_main, args)
        assert result.exit_code == 1, (args, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), args
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, result.stderr)
    assert (tmp_path / "occupied" / "keep.txt").read_text() == "mine"
    for args in (["search", index, "q", "--top-k", "0"], ["index", "--index", index]):
        assert CliRunner().invoke(retrieve_main, args).exit_code == 2  # usage errors

    good = str(tmp_path / "good")
    assert (
        _cli(
            "index", str(root / "white.jpg"), "--index", good, "--model", model, "--quiet"
        ).exit_code
        == 0
    )
    result = CliRunner().invoke(retrieve_main, ["search", good, "  "])
    assert result.exit_code == 1 and "empty" in result.stderr
    result = CliRunner().invoke(
        retrieve_main, ["index", str(root / "doc.pdf"), "--index", good, "--dpi", "100"]
    )
    assert result.exit_code == 1 and "dpi=144" in result.stderr
    assert json.loads((tmp_path / "good" / "index.json").read_text())["model"] == model


def test_index_resumes_after_sigkill_without_duplicates(planted, tmp_path):
    colors = ["red", "green", "blue", "yellow"] * 3
    pages = [Image.new("RGB", (160, 160), COLORS[c]) for c in colors]
    pdf = tmp_path / "long.pdf"
    pages[0].save(pdf, save_all=True, append_images=pages[1:])
    index = tmp_path / "index"
    command = [
        sys.executable, "-m", "mlx_smolvlm.retrieve", "index", str(pdf), "--index", str(index),
        "--model", str(planted["model"]), "--batch-size", "1", "--shard-pages", "1", "--quiet",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    manifest = index / MANIFEST
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        if manifest.exists() and len(manifest.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = len(manifest.read_text().splitlines())
    assert 2 <= done < len(colors)
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    entries = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert sorted(e["page"] for e in entries) == list(range(1, len(colors) + 1))
    assert [e["id"] for e in entries] == list(range(len(colors)))
    shards = sorted(p.name for p in index.glob("embeddings-*.safetensors"))
    assert shards == sorted({e["shard"] for e in entries})
    assert not list(index.glob(".*"))
    result = _cli("search", str(index), "yellow", "--json", "--top-k", "3")
    hits = json.loads(result.stdout)[0]["results"]
    assert sorted(hit["page"] for hit in hits) == [4, 8, 12]


def test_example_retrieves_a_page_and_answers_about_it(planted, tmp_path, monkeypatch, capsys):
    answerer = smolvlm_checkpoint(tmp_path / "smolvlm")
    sys.path.insert(0, str(REPO / "examples"))
    try:
        import retrieve_and_answer
    finally:
        sys.path.remove(str(REPO / "examples"))
    root = planted["root"]
    argv = [
        "retrieve_and_answer.py", "blue", str(root / "doc.pdf"), str(root / "white.jpg"),
        "--index", str(tmp_path / "index"), "--retriever", str(planted["model"]),
        "--model", str(answerer), "--max-tokens", "3",
    ]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    retrieve_and_answer.main()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Best page (") and lines[0].endswith("doc.pdf page 3")
    assert len(lines) >= 2  # the answer (random weights: any text)
