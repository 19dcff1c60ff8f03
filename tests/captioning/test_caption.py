"""Dataset captioning: inputs, records, resume after a kill, and two ranks under mlx.launch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image, ImageDraw
from reference import write_checkpoint

from mlx_smolvlm import generate, load
from mlx_smolvlm.caption import main
from mlx_smolvlm.captioning import Item, merge, read_items, select, shard
from mlx_smolvlm.captioning.records import done_ids, part_path, parts_dir

# mlx.launch is installed beside the Python running the tests (venv activated or not).
LAUNCH = str(Path(sys.executable).with_name("mlx.launch"))
ROOT = Path(__file__).resolve().parents[2]
GENERATION = ["--max-tokens", "6", "--no-image-splitting"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random SmolVLM (128-pixel tiles) with the real 256M tokenizer and processor."""
    return write_checkpoint(tmp_path_factory.mktemp("caption") / "tiny")


def picture(width: int, height: int, hue: int) -> Image.Image:
    image = Image.new("RGB", (width, height), (hue, 90, 160))
    ImageDraw.Draw(image).ellipse((4, 4, width // 2, height // 2), fill=(240, 200, hue))
    return image


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Seven images in nested folders, a truncated file and a too-large one among them."""
    root = tmp_path_factory.mktemp("images")
    (root / "a").mkdir()
    (root / "z" / "deep").mkdir(parents=True)
    for i, name in enumerate(["a/1.png", "a/2.JPG", "b.png", "c.webp", "z/5.png", "z/deep/6.png"]):
        picture(40 + 8 * i, 48, 30 * i).save(root / name)
    picture(300, 300, 99).save(root / "big.png")  # refused by --max-pixels 40000
    whole = (root / "b.png").read_bytes()
    (root / "broken.png").write_bytes(whole[: len(whole) // 2])  # truncated
    (root / "notes.txt").write_text("not an image")
    return root


EXPECTED_IDS = [
    "a/1.png",
    "a/2.JPG",
    "b.png",
    "big.png",
    "broken.png",
    "c.webp",
    "z/5.png",
    "z/deep/6.png",
]


def run_cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def one_process(checkpoint, folder, tmp_path_factory) -> Path:
    """The output of a plain one-process run over the folder (batches of 3)."""
    output = tmp_path_factory.mktemp("single") / "captions.jsonl"
    result = run_cli(
        folder, "-o", output, "--model", checkpoint, "--batch-size", 3, "--max-pixels", 40000,
        *GENERATION,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Captioned 6 images (2 failed, 0 already done)" in result.output
    return output


def test_folder_run_records_captions_and_failures(one_process, checkpoint, folder):
    records = read_jsonl(one_process)
    assert [r["id"] for r in records] == EXPECTED_IDS
    assert not parts_dir(one_process).exists()
    failures = {r["id"]: r for r in records if "error" in r}
    assert set(failures) == {"big.png", "broken.png"}
    assert "300x300 pixels, above --max-pixels 40000" in failures["big.png"]["error"]
    assert "truncated" in failures["broken.png"]["error"]
    assert set(failures["broken.png"]) == {"id", "path", "error"}
    # The captions are what generate says about each image alone.
    model, processor = load(checkpoint)
    for record in records:
        if "error" in record:
            continue
        assert set(record) == {"id", "path", "prompt", "text", "tokens", "finish_reason"}
        assert record["path"] == str(folder / record["id"])
        alone = generate(
            model,
            processor,
            "Describe this image.",
            record["path"],
            max_tokens=6,
            do_image_splitting=False,
        )
        assert (record["text"], record["tokens"]) == (alone.text, alone.generation_tokens)
        assert record["finish_reason"] == alone.finish_reason


def test_two_ranks_match_one_process(one_process, checkpoint, folder, tmp_path):
    output = tmp_path / "captions.jsonl"
    command = [
        LAUNCH, "--backend", "ring", "-n", "2", "--python", sys.executable,
        "--", "-m", "mlx_smolvlm.caption", str(folder), "-o", str(output), "--model",
        str(checkpoint), "--batch-size", "3", "--max-pixels", "40000", *GENERATION,
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, env=_env(), stdin=subprocess.DEVNULL, capture_output=True, timeout=300
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert output.read_bytes() == one_process.read_bytes()
    assert not parts_dir(output).exists()
    assert "on 2 ranks" in done.stderr.decode()


def test_resume_after_kill_captions_each_image_once(one_process, checkpoint, folder, tmp_path):
    output = tmp_path / "captions.jsonl"
    args = [
        str(folder), "-o", str(output), "--model", str(checkpoint), "--batch-size", "1",
        "--max-pixels", "40000", *GENERATION,
    ]  # fmt: skip
    process = subprocess.Popen(
        [sys.executable, "-m", "mlx_smolvlm.caption", *args, "--quiet"],
        cwd=ROOT,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    part = part_path(output, 0)
    deadline = time.monotonic() + 240
    while _lines(part) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    written = _lines(part)
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()[-2000:]
    assert 3 <= written < len(EXPECTED_IDS) and not output.exists()
    with open(part, "ab") as f:
        f.write(b'{"id": "z/5.png", "path": "')  # a write cut short by the kill

    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    rest = read_jsonl(one_process)[written:]
    failed = sum("error" in r for r in rest)
    summary = f"Captioned {len(rest) - failed} images ({failed} failed, {written} already done)"
    assert summary in result.output
    assert output.read_bytes() == one_process.read_bytes()  # nothing twice, nothing missing
    assert not parts_dir(output).exists()


def test_table_with_prompts_shuffled_and_limited(checkpoint, folder, tmp_path):
    table = tmp_path / "questions.csv"
    rows = [("b.png", "What colour is it?"), ("c.webp", "Is there a circle?"), ("a/1.png", "Hi")]
    table.write_text("image,question\n" + "".join(f"{folder / i},{q}\n" for i, q in rows))
    output = tmp_path / "answers.jsonl"
    options = ["--prompt-column", "question", "--shuffle", "--seed", "4", "--limit", "2"]
    result = run_cli(table, "-o", output, "--model", checkpoint, *options, *GENERATION)
    assert result.exit_code == 0, result.output
    chosen = select(read_items(table, prompt_column="question"), shuffle=True, seed=4, limit=2)
    records = read_jsonl(output)
    assert [(r["id"], r["prompt"]) for r in records] == [(i.id, i.prompt) for i in chosen]
    model, processor = load(checkpoint)
    for record in records:
        alone = generate(
            model, processor, record["prompt"], record["path"], max_tokens=6,
            do_image_splitting=False,
        )  # fmt: skip
        assert record["text"] == alone.text


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def test_merge_orders_records_keeps_first_and_ignores_torn_tail(tmp_path):
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"id": "a", "text": "from the earlier output"}) + "\n")
    parts_dir(output).mkdir()
    # Parts of an interrupted three-rank run: rank 2 wrote "b", rank 0 "d" and a torn line.
    part_path(output, 0).write_bytes(b'{"id": "d", "text": "x"}\n{"id": "c", "te')
    part_path(output, 2).write_text(
        json.dumps({"id": "b", "error": "bad"}) + "\n" + json.dumps({"id": "a", "text": "again"})
        + "\n" + json.dumps({"id": "old", "text": "not in this run"}) + "\n"
    )  # fmt: skip
    assert done_ids(output) == {"a", "b", "d", "old"}
    assert merge(output, ["a", "b", "c", "d"]) == 4
    assert read_jsonl(output) == [
        {"id": "a", "text": "from the earlier output"},
        {"id": "b", "error": "bad"},
        {"id": "d", "text": "x"},
        {"id": "old", "text": "not in this run"},
    ]
    assert not parts_dir(output).exists()


def test_shards_are_whole_batches_of_the_one_process_run():
    items = [Item(str(i), f"{i}.png", "p") for i in range(11)]
    alone = shard(items, 3, 0, 1)
    assert [len(b) for b in alone] == [3, 3, 3, 2]
    shares = [shard(items, 3, rank, 3) for rank in range(3)]
    assert shares == [[alone[0], alone[3]], [alone[1]], [alone[2]]]


def test_tables_lists_prompts_ids_and_selection(tmp_path):
    (tmp_path / "imgs").mkdir()
    rows = [{"image": "imgs/x.png", "q": "What colour?"}, {"image": "/abs/y.png", "q": "Count."}]
    table = tmp_path / "t.jsonl"
    table.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    items = read_items(table, prompt_column="q")
    assert items == [
        Item("imgs/x.png", str(tmp_path / "imgs/x.png"), "What colour?"),
        Item("/abs/y.png", "/abs/y.png", "Count."),
    ]
    csv_file = tmp_path / "t.csv"
    csv_file.write_text("key,picture\nk1,imgs/x.png\nk2,imgs/x.png\n")
    assert [(i.id, i.prompt) for i in read_items(csv_file, "Hi", "picture", id_column="key")] == [
        ("k1", "Hi"),
        ("k2", "Hi"),
    ]
    listing = tmp_path / "list.txt"
    listing.write_text("# my images\nimgs/x.png\n\nhttps://example.com/a.png\n")
    assert [(i.id, i.path) for i in read_items(listing)] == [
        ("imgs/x.png", str(tmp_path / "imgs/x.png")),
        ("https://example.com/a.png", "https://example.com/a.png"),
    ]
    many = [Item(str(i), "", "") for i in range(20)]
    assert select(many, limit=3) == many[:3]
    picked = select(many, shuffle=True, seed=5, limit=4)
    assert picked == select(many, shuffle=True, seed=5, limit=4) != many[:4]
    assert picked != select(many, shuffle=True, seed=6, limit=4)


@pytest.mark.parametrize(
    "files, args, culprit",
    [
        ({}, ["missing-folder"], "missing-folder does not exist"),
        ({"empty/notes.txt": "x"}, ["empty"], "no images"),
        ({"t.jsonl": '{"img": "a.png"}\n'}, ["t.jsonl"], "t.jsonl line 1 has no 'image' value"),
        ({"t.jsonl": '{"image": "a.png"}\nnot json\n'}, ["t.jsonl"], "line 2 is not valid JSON"),
        ({"l.txt": "a.png\nb.png\na.png\n"}, ["l.txt"], "'a.png' on lines 1 and 3"),
        ({"t.csv": "image\na.png\n"}, ["t.csv", "--prompt-column", "q"], "no 'q' value"),
        ({"l.txt": "a.png\n"}, ["l.txt", "--prompt", "x", "--prompt-column", "q"], "not both"),
        ({"l.txt": "a.png\n"}, ["l.txt", "--batch-size", "0"], "--batch-size"),
        ({"l.txt": "a.png\n"}, ["l.txt", "--repetition-penalty", "1.1"], "not available"),
        ({"l.txt": "a.png\n"}, ["l.txt", "--top-p", "2"], "--top-p must be"),
        ({"l.txt": "a.png\n"}, ["l.txt", "--max-tiles", "0"], "--max-tiles must be"),
    ],
)
def test_bad_inputs_fail_in_one_line(tmp_path, monkeypatch, files, args, culprit):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.chdir(tmp_path)
    result = run_cli(*args, "-o", "out.jsonl", "--model", "no-such-model")
    assert result.exit_code != 0
    assert culprit in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "output, culprit",
    [
        ("notes.txt", "notes.txt line 2 is not a caption record"),
        ("folder", "is a folder"),
        ("nowhere/out.jsonl", "folder nowhere does not exist"),
    ],
)
def test_bad_output_is_refused_and_left_intact(tmp_path, monkeypatch, output, culprit):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "folder").mkdir()
    notes = '{"id": "x"}\nmy precious notes\n'
    (tmp_path / "notes.txt").write_text(notes)
    result = run_cli("a.png", "-o", output, "--model", "no-such-model")
    assert result.exit_code == 1
    assert result.output.count("\n") == 1 and culprit in result.output
    assert (tmp_path / "notes.txt").read_text() == notes
