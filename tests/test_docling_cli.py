"""`python -m mlx_smolvlm.docling` end to end on random checkpoints, its errors, and greedy parity."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from pages import PAGE_FIGURES, PAGE_TEXT, make_encrypted_pdf, make_pdf, page_image
from reference import save_hf_checkpoint, tiny_config_for_real_tokenizer

from mlx_smolvlm import load
from mlx_smolvlm.docling import main
from mlx_smolvlm.documents import DEFAULT_PROMPT, extras, generate_doctags, pipeline, render_pages
from mlx_smolvlm.processing.pages import open_source


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, *names: str) -> None:
    """Non-zero exit, a single 'Error: ...' line naming the culprits, no traceback."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for name in names:
        assert name in lines[0]


@pytest.fixture(scope="module")
def smoldocling(tmp_path_factory):
    """A random checkpoint with SmolDocling's geometry and tokenizer (SmolVLM-256M's), tiny widths."""
    from conftest import real_model_dir

    path = tmp_path_factory.mktemp("tiny-smoldocling")
    hf = save_hf_checkpoint(
        path, tiny_config_for_real_tokenizer(), seed=3, tokenizer_dir=real_model_dir()
    )
    return path, hf


def test_bad_inputs_are_one_line_errors(tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf", pages=2)
    (tmp_path / "garbage.pdf").write_bytes(b"\x00\x01 not a pdf")
    (tmp_path / "notes.txt").write_text("hello")
    locked = make_encrypted_pdf(tmp_path / "locked.pdf")
    cut = tmp_path / "cut.pdf"
    cut.write_bytes(pdf.read_bytes()[:3000])
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "out"
    cases = [
        ([tmp_path / "missing.pdf", "-o", out], ["missing.pdf", "no such file"]),
        ([tmp_path / "garbage.pdf", "-o", out], ["garbage.pdf", "not a readable PDF"]),
        ([tmp_path / "notes.txt", "-o", out], ["notes.txt", "neither a PDF nor an image"]),
        ([locked, "-o", out], ["locked.pdf", "Incorrect password"]),
        ([cut, "-o", out], ["cut.pdf", "not a readable PDF"]),
        ([tmp_path / "empty", "-o", out], ["empty", "holds no PDF or image"]),
        ([pdf, "-o", out, "--pages", "2-5"], ["doc.pdf", "page 5 is out of range", "has 2"]),
        ([pdf, "-o", out, "--pages", "x"], ["doc.pdf", "'x' is not N, N-M or N-"]),
        ([pdf, "-o", out, "--to", "md,pdf"], ["unknown --to format pdf"]),
        ([pdf, "-o", tmp_path / "afile"], ["afile", "is a file"]),
    ]
    for args, names in cases:
        result = run(*args)
        assert_one_line_error(result, *names)
    assert not out.exists()


def test_two_documents_with_one_name(tmp_path):
    make_pdf(tmp_path / "report.pdf", pages=1)
    page_image(0).save(tmp_path / "report.png")
    result = run(tmp_path, "-o", tmp_path / "out")
    assert_one_line_error(result, "report.pdf", "report.png", "different --output")


def test_missing_extra_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(extras, "MISSING", "docling_core")
    result = run(make_pdf(tmp_path / "doc.pdf", pages=1), "-o", tmp_path / "out")
    assert_one_line_error(
        result, "docling_core is not installed", 'pip install "mlx-smolvlm[docling]"'
    )


def test_a_model_that_cannot_load(tmp_path):
    result = run(
        make_pdf(tmp_path / "doc.pdf", 1), "-o", tmp_path / "o", "--model", tmp_path / "none"
    )
    assert_one_line_error(result, "--model", "none")


def test_random_smoldocling_end_to_end(smoldocling, tmp_path):
    """Random weights write malformed DocTags: every page is reported and kept raw, the files are
    written with all pages, a rerun skips the document, --overwrite redoes it."""
    checkpoint, _ = smoldocling
    pdf = make_pdf(tmp_path / "report.pdf", pages=3)
    page_image(0).save(tmp_path / "scan.png")
    out = tmp_path / "out"
    args = [pdf, tmp_path / "scan.png", "-o", out, "--model", checkpoint, "--max-tokens", "6"]
    result = run(*args, "--to", "md,html,json,doctags", "--batch-size", "2")
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "report.doctags",
        "report.html",
        "report.json",
        "report.md",
        "scan.doctags",
        "scan.html",
        "scan.json",
        "scan.md",
    ]
    document = json.loads((out / "report.json").read_text())
    assert sorted(document["pages"]) == ["1", "2", "3"]
    assert document["pages"]["2"]["size"] == {"width": 1224.0, "height": 1584.0}
    assert sorted(json.loads((out / "scan.json").read_text())["pages"]) == ["1"]
    raw = (out / "report.doctags").read_text().split("\n<page_break>\n")
    assert len(raw) == 3 and all(page.strip() for page in raw)
    for n in (1, 2, 3):
        assert (
            f"{pdf}: page {n} kept as raw DocTags in {out / 'report.doctags'} "
            "(cut at max_tokens (6) before </doctag>)"
        ) in result.stderr
    assert "3/3" in result.stderr and "page/s" in result.stderr  # the progress bar
    assert f"{pdf}: 3 pages in " in result.stdout

    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = run(*args, "--to", "html,md")
    assert again.exit_code == 0
    assert again.stdout.splitlines() == [
        f"{pdf}: already converted in {out} (--overwrite redoes it)",
        f"{tmp_path / 'scan.png'}: already converted in {out} (--overwrite redoes it)",
    ]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # --pages selects PDF pages; an image is its one page.
    redo = run(*args, "--pages", "3", "--to", "md", "--overwrite")
    assert redo.exit_code == 0, redo.output
    assert (out / "report.md").stat().st_mtime_ns > stamps["report.md"]
    assert (out / "scan.md").stat().st_mtime_ns > stamps["scan.md"]
    assert "<page_break>" not in (out / "report.doctags").read_text()
    assert "page 3 kept as raw DocTags" in redo.stderr and "report.pdf: page 1 " not in redo.stderr


def test_good_pages_convert_beside_a_truncated_one(smoldocling, tmp_path, monkeypatch):
    """The CLI with prepared DocTags: pages 1 and 3 convert, page 2 is cut and reported."""
    from test_documents import FakeBatch

    checkpoint, _ = smoldocling
    _, processor = load(checkpoint)
    answers = [(PAGE_TEXT, "stop"), (PAGE_FIGURES[:90], "length"), (PAGE_FIGURES, "stop")]
    monkeypatch.setattr(pipeline, "batch_generate", FakeBatch(processor.tokenizer, answers))
    pdf = make_pdf(tmp_path / "report.pdf", pages=3)
    result = run(pdf, "-o", tmp_path, "--model", checkpoint, "--to", "md", "--images", "referenced")
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# Annual Report\n\n## 1 Introduction")
    assert "### 1.1 Code and maths" in markdown and "print('hi')" in markdown
    assert len(list((tmp_path / "report_artifacts").glob("*.png"))) == 1
    assert (tmp_path / "report.doctags").read_text().split("\n<page_break>\n")[1] == PAGE_FIGURES[
        :90
    ]
    assert "page 2 kept as raw DocTags" in result.stderr
    assert "page 1 " not in result.stderr and "page 3 " not in result.stderr


@pytest.mark.torch
def test_greedy_doctags_tokens_equal_transformers_generate(smoldocling, tmp_path):
    """The pipeline's greedy tokens for two rendered pages, batched together, are transformers'.

    The pages are resized to a 1024 longest edge (2x2 tiles and the global view) to keep
    transformers' side quick; the tiling itself is checked against transformers elsewhere.
    """
    import torch
    from PIL import ImageOps
    from transformers import AutoProcessor

    checkpoint, hf = smoldocling
    model, processor = load(checkpoint)
    source = open_source(make_pdf(tmp_path / "doc.pdf", pages=1))
    (rendered,) = render_pages(source, [1])
    pages = [rendered, (2, ImageOps.invert(rendered[1]))]
    ours = generate_doctags(model, processor, pages, max_tokens=12, batch_size=2, longest_edge=1024)
    assert ours[0].token_ids != ours[1].token_ids

    hf_processor = AutoProcessor.from_pretrained(checkpoint)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_PROMPT}]}
    ]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    eos = sorted(processor.tokenizer.eos_token_ids)
    for (_, image), page in zip(pages, ours):
        inputs = hf_processor(
            text=text, images=[image], size={"longest_edge": 1024}, return_tensors="pt"
        )
        assert inputs["pixel_values"].shape[1] == 5
        with torch.no_grad():
            out = hf.generate(
                **inputs, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos[0]
            )
        expected = out[0, inputs["input_ids"].shape[1] :].tolist()
        assert page.token_ids == [t for t in expected if t not in eos]
        assert page.doctags == processor.tokenizer.decode(page.token_ids, skip_special_tokens=False)


def test_a_document_failing_midway_does_not_stop_the_others(smoldocling, tmp_path, monkeypatch):
    from test_documents import FakeBatch

    checkpoint, _ = smoldocling
    _, processor = load(checkpoint)
    monkeypatch.setattr(
        pipeline, "batch_generate", FakeBatch(processor.tokenizer, [(PAGE_TEXT, "stop")])
    )
    render = pipeline.render_pages

    def flaky(source, pages, dpi):
        if source.name == "a":
            raise OSError("disk read error")
        return render(source, pages, dpi)

    monkeypatch.setattr(pipeline, "render_pages", flaky)
    make_pdf(tmp_path / "a.pdf", pages=1)
    make_pdf(tmp_path / "b.pdf", pages=1)
    result = run(
        tmp_path / "a.pdf", tmp_path / "b.pdf", "-o", tmp_path / "out", "--model", checkpoint
    )
    assert result.exit_code == 1
    assert f"Error: {tmp_path / 'a.pdf'}: disk read error" in result.stderr
    assert "Traceback" not in result.output
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.md"]

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(pipeline, "batch_generate", broken)
    out = tmp_path / "again"
    result = run(tmp_path / "b.pdf", "-o", out, "--model", checkpoint)
    assert result.exit_code == 1 and "Traceback" not in result.output
    error = f"Error: {tmp_path / 'b.pdf'}: RuntimeError: out of memory"
    assert result.stderr.strip().splitlines()[-1] == error  # after the progress bar
    assert list(out.iterdir()) == []


@pytest.fixture(scope="module")
def granite(tmp_path_factory):
    """A random checkpoint of granite-docling's config (its vocabulary, special ids, tied
    embeddings and patch geometry) with tiny widths and depths, and its tokenizer files."""
    from conftest import real_model_dir

    shared = real_model_dir("granite-docling-258M")
    config = json.loads((shared / "config.json").read_text())
    config["text_config"].update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16,
    )  # fmt: skip
    config["vision_config"].update(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
    )
    path = tmp_path_factory.mktemp("tiny-granite-docling")
    hf = save_hf_checkpoint(path, config, seed=5, tokenizer_dir=shared)
    return path, hf


def test_random_granite_docling_end_to_end(granite, tmp_path):
    checkpoint, _ = granite
    pdf = make_pdf(tmp_path / "paper.pdf", pages=2)
    out = tmp_path / "out"
    args = [pdf, "-o", out, "--model", checkpoint, "--max-tokens", "6", "--to", "md,json"]
    result = run(*args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == ["paper.doctags", "paper.json", "paper.md"]
    assert sorted(json.loads((out / "paper.json").read_text())["pages"]) == ["1", "2"]
    assert len((out / "paper.doctags").read_text().split("\n<page_break>\n")) == 2
    for n in (1, 2):
        assert f"{pdf}: page {n} kept as raw DocTags" in result.stderr
    again = run(*args)
    assert again.exit_code == 0 and "already converted" in again.stdout


def test_granite_doctags_tags_are_special_tokens_kept_in_the_text(granite, monkeypatch):
    """In granite-docling's vocabulary <doctag>, <text>... are special tokens: the raw DocTags
    keeps them, and </doctag> ends a page as an end-of-turn token."""
    from test_documents import FakeBatch

    checkpoint, _ = granite
    _, processor = load(checkpoint)
    tokenizer = processor.tokenizer
    end = tokenizer.convert_tokens_to_ids("</doctag>")
    assert end == 100328

    class EndsOnTheToken(FakeBatch):
        def __call__(self, *args, **kwargs):
            results = super().__call__(*args, **kwargs)
            for result in results:
                if result.token_ids[-1] == end:
                    result.token = result.token_ids.pop()
            return results

    fake = EndsOnTheToken(tokenizer, [(PAGE_TEXT, "stop"), (PAGE_FIGURES[:70], "length")])
    monkeypatch.setattr(pipeline, "batch_generate", fake)
    pages = generate_doctags(None, processor, [(1, page_image(0)), (2, page_image(1))])
    assert fake.calls[0]["eos_token_ids"] >= {100257, end}
    assert [p.doctags for p in pages] == [PAGE_TEXT, PAGE_FIGURES[:70]]
    assert pages[0].problem is None and pages[1].problem.startswith("cut at max_tokens")


@pytest.mark.torch
def test_granite_greedy_tokens_equal_transformers_generate(granite, tmp_path):
    import torch
    from transformers import AutoProcessor

    checkpoint, hf = granite
    model, processor = load(checkpoint)
    (page,) = render_pages(open_source(make_pdf(tmp_path / "doc.pdf", pages=1)), [1])
    (ours,) = generate_doctags(model, processor, [page], max_tokens=12, longest_edge=1024)
    hf_processor = AutoProcessor.from_pretrained(checkpoint)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DEFAULT_PROMPT}]}
    ]
    text = hf_processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text == processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = hf_processor(
        text=text, images=[page[1]], size={"longest_edge": 1024}, return_tensors="pt"
    )
    eos = sorted(processor.tokenizer.eos_token_ids | {100328})
    with torch.no_grad():
        out = hf.generate(
            **inputs, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=100257
        )
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert ours.token_ids == [t for t in expected if t not in eos]
