"""Documents: DocTags -> DoclingDocument (docling-core), page sources and rendering, batching."""

from __future__ import annotations

import json

import pytest
from pages import (
    HTML_BODY,
    MARKDOWN,
    PAGE_FIGURES,
    PAGE_TEXT,
    make_encrypted_pdf,
    make_pdf,
    page_image,
)
from PIL import Image

from mlx_smolvlm import GenerationResult
from mlx_smolvlm.documents import (
    Conversion,
    PageResult,
    check_doctags,
    convert,
    convert_document,
    generate_doctags,
    open_source,
    parse_pages,
    pipeline,
    render_pages,
    to_docling,
    write_document,
)

# A page rendered at docling's 144 dpi: twice the PDF's points.
RENDERED = (1224, 1584)


def test_every_element_is_well_formed():
    assert check_doctags(PAGE_TEXT) is None
    assert check_doctags(PAGE_FIGURES) is None
    assert check_doctags("  <doctag><text>P < 0.05 and a<b>c</text></doctag>\n") is None


@pytest.mark.parametrize(
    "doctags, problem",
    [
        (PAGE_TEXT[:-40], "it does not end with </doctag>"),
        ("random words <text>", "it does not start with <doctag>"),
        ("<doctag><text>a</title></doctag>", "</title> closes <text>"),
        ("<doctag><text>a</doctag>", "</doctag> closes <text>"),
        ("<doctag>stray<text>a</text></doctag>", "text outside any element: 'stray'"),
        ("<doctag><text>a</text></doctag><text>b</text></doctag>", "content after </doctag>"),
        ("<doctag><doctag></doctag></doctag>", "a second <doctag> inside the page"),
        ("<doctag></text></doctag>", "</text> closes <doctag>"),
    ],
)
def test_malformed_doctags_are_named(doctags, problem):
    assert check_doctags(doctags) == problem


def test_handwritten_pages_give_docling_cores_markdown_and_html():
    images = [page_image(0, RENDERED), page_image(1, RENDERED)]
    document, unreadable = to_docling([PAGE_TEXT, PAGE_FIGURES], images, "report")
    assert unreadable == []
    assert document.name == "report"
    assert document.export_to_markdown() == MARKDOWN
    html = document.export_to_html()
    positions = [html.index(fragment) for fragment in HTML_BODY]
    assert positions == sorted(positions)
    assert "ACME Corp." not in document.export_to_markdown()  # page header: furniture


def test_locations_map_onto_the_page_image():
    width, height = RENDERED
    images = [page_image(0, RENDERED), page_image(1, RENDERED)]
    document, _ = to_docling([PAGE_TEXT, PAGE_FIGURES], images, "report")
    assert sorted(document.pages) == [1, 2]
    assert (document.pages[2].size.width, document.pages[2].size.height) == RENDERED
    title = document.texts[1]
    assert title.text == "Annual Report"
    box = title.prov[0].bbox
    assert title.prov[0].page_no == 1
    assert (box.l, box.t, box.r, box.b) == pytest.approx(
        (50 / 500 * width, 20 / 500 * height, 450 / 500 * width, 40 / 500 * height)
    )
    table = document.tables[0]
    assert table.prov[0].bbox.as_tuple() == pytest.approx(
        (100 / 1000 * width, 260 / 1000 * height, 900 / 1000 * width, 400 / 1000 * height)
    )
    assert [[c.text for c in row] for row in table.data.grid] == [
        ["Name", "Value"],
        ["alpha", "1"],
        ["beta", "2"],
    ]
    picture = document.pictures[0]
    assert picture.prov[0].page_no == 2
    assert picture.prov[0].bbox.as_tuple() == pytest.approx(
        (width / 5, height * 2 / 5, width * 3 / 5, height * 4 / 5)
    )
    crop = picture.get_image(document)
    expected = images[1].crop(
        (int(width / 5), int(height * 2 / 5), int(width * 3 / 5), int(height * 4 / 5))
    )
    assert crop.size == expected.size
    assert crop.tobytes() == expected.tobytes()
    assert crop.getpixel((crop.width // 2, crop.height // 2)) == (220, 0, 0)
    caption = picture.captions[0].resolve(document)
    assert caption.text == "Figure 1: A red square"
    assert caption.prov[0].bbox.as_tuple() == pytest.approx(
        (100 / 500 * width, 405 / 500 * height, 300 / 500 * width, 420 / 500 * height)
    )


def test_a_page_docling_core_cannot_read_stays_empty_and_the_others_convert():
    inverted = "<doctag><picture><loc_300><loc_400><loc_100><loc_200></picture></doctag>"
    images = [page_image(i, RENDERED) for i in range(3)]
    document, unreadable = to_docling([PAGE_TEXT, inverted, PAGE_FIGURES], images, "report")
    assert unreadable == [1]
    assert sorted(document.pages) == [1, 2, 3]
    assert document.export_to_markdown() == MARKDOWN
    assert not any(item.prov[0].page_no == 2 for item, _ in document.iterate_items())


@pytest.mark.parametrize("images", ["embedded", "referenced", "placeholder"])
def test_pictures_embedded_referenced_or_placeholders(tmp_path, images):
    pages = [
        PageResult(n, text, page_image(n, RENDERED), [], "stop")
        for n, text in ((1, PAGE_TEXT), (2, PAGE_FIGURES))
    ]
    document, _ = to_docling([p.doctags for p in pages], [p.image for p in pages], "report")
    paths = write_document(Conversion(document, pages), tmp_path, "report", ["md", "html"], images)
    assert [p.name for p in paths] == ["report.md", "report.html"]
    markdown, html = (p.read_text() for p in paths)
    artifacts = sorted((tmp_path / "report_artifacts").glob("*.png"))
    if images == "embedded":
        assert "![Image](data:image/png;base64," in markdown
        assert '<img src="data:image/png;base64,' in html
        assert not artifacts
    elif images == "referenced":
        assert len(artifacts) == 1
        assert f"![Image](report_artifacts/{artifacts[0].name})" in markdown
        assert f'src="report_artifacts/{artifacts[0].name}"' in html
    else:
        assert "<!-- image -->" in markdown
        assert "<img" not in html
        assert not artifacts
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["report.html", "report.md"]


def test_json_and_doctags_files(tmp_path):
    pages = [PageResult(1, PAGE_TEXT, page_image(0, RENDERED), [], "stop")]
    document, _ = to_docling([PAGE_TEXT], [pages[0].image], "report")
    write_document(Conversion(document, pages), tmp_path, "report", ["json", "doctags"])
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["name"] == "report"
    assert list(data["pages"]) == ["1"]
    assert (tmp_path / "report.doctags").read_text() == PAGE_TEXT + "\n"


def test_malformed_pages_always_keep_their_raw_doctags(tmp_path):
    cut = PAGE_FIGURES[:60]
    pages = [
        PageResult(1, PAGE_TEXT, None, [], "stop"),
        PageResult(4, cut, None, [], "length", "cut at max_tokens (8) before </doctag>"),
    ]
    document, _ = to_docling([p.doctags for p in pages], [None, None], "report")
    paths = write_document(Conversion(document, pages), tmp_path, "report", ["md"])
    assert [p.name for p in paths] == ["report.md", "report.doctags"]
    assert paths[1].read_text() == f"{PAGE_TEXT}\n<page_break>\n{cut}\n"


@pytest.mark.parametrize(
    "spec, count, pages",
    [
        (None, 3, [1, 2, 3]),
        ("2", 3, [2]),
        ("1-3,7", 9, [1, 2, 3, 7]),
        ("5-", 6, [5, 6]),
        (" 2 - 3 , 1 ", 3, [2, 3, 1]),
        ("1,1-2", 3, [1, 2]),
    ],
)
def test_page_ranges(spec, count, pages):
    assert parse_pages(spec, count) == pages


@pytest.mark.parametrize(
    "spec, message",
    [
        ("4", "--pages '4': page 4 is out of range (the document has 3)"),
        ("2-9", "--pages '2-9': page 9 is out of range (the document has 3)"),
        ("0", "--pages '0': '0' is an empty range"),
        ("3-2", "--pages '3-2': '3-2' is an empty range"),
        ("a-b", "--pages 'a-b': 'a-b' is not N, N-M or N-"),
        ("1,,2", "--pages '1,,2': '' is not N, N-M or N-"),
    ],
)
def test_bad_page_ranges(spec, message):
    with pytest.raises(ValueError) as error:
        parse_pages(spec, 3)
    assert str(error.value) == message


def test_sources_pdf_image_and_bad_files(tmp_path):
    pdf = open_source(make_pdf(tmp_path / "doc.pdf", pages=3))
    assert (pdf.kind, pdf.page_count, pdf.name) == ("pdf", 3, "doc")
    page_image(0).save(tmp_path / "scan.png")
    assert open_source(tmp_path / "scan.png").kind == "image"
    (tmp_path / "notes.pdf").write_text("not a pdf at all")
    (tmp_path / "notes.txt").write_text("neither")
    cut = tmp_path / "cut.pdf"
    cut.write_bytes((tmp_path / "doc.pdf").read_bytes()[:2000])
    for name, message in [
        ("notes.pdf", "not a readable PDF (Failed to load document (PDFium: Data format error).)"),
        ("cut.pdf", "not a readable PDF"),
        ("notes.txt", "neither a PDF nor an image"),
    ]:
        with pytest.raises(
            ValueError,
            match=f"^{tmp_path / name}: " + message.replace("(", r"\(").replace(")", r"\)"),
        ):
            open_source(tmp_path / name)
    with pytest.raises(ValueError, match="Incorrect password"):
        open_source(make_encrypted_pdf(tmp_path / "locked.pdf"))


def test_an_image_too_large_to_open_safely(tmp_path, monkeypatch):
    page_image(0).save(tmp_path / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # PIL refuses images over twice this
    with pytest.raises(ValueError, match=f"^{tmp_path / 'huge.png'}: Image size"):
        open_source(tmp_path / "huge.png")


def test_pdf_pages_render_at_docling_resolution(tmp_path):
    source = open_source(make_pdf(tmp_path / "doc.pdf", pages=3))
    rendered = list(render_pages(source, [3, 1]))
    assert [n for n, _ in rendered] == [3, 1]
    image = rendered[0][1]
    assert image.mode == "RGB" and image.size == RENDERED
    # Pillow stores the pages as JPEG: colours come back within a few levels.
    red = image.getpixel((RENDERED[0] // 2, RENDERED[1] * 3 // 5))
    blue = image.getpixel((5, 5))
    assert max(abs(a - b) for a, b in zip(red + blue, (220, 0, 0, 20, 40, 120))) <= 3
    ((_, small),) = render_pages(source, [2], dpi=36)
    assert small.size == (306, 396)


class FakeBatch:
    """Stands in for batch_generate: answers each page with prepared token ids."""

    def __init__(self, tokenizer, answers: list[tuple[str, str]]):
        self.tokenizer = tokenizer
        self.answers = iter(answers)
        self.calls: list[dict] = []

    def __call__(self, model, processor, prompts, images, **kwargs):
        self.calls.append({"prompts": prompts, "images": images, **kwargs})
        results = []
        for _ in prompts:
            text, reason = next(self.answers)
            ids = self.tokenizer.encode(text)
            results.append(GenerationResult(token=ids[-1], token_ids=ids, finish_reason=reason))
        return results


@pytest.fixture(scope="module")
def smol_processor():
    from conftest import real_model_dir

    from mlx_smolvlm.processing import Processor

    return Processor.from_pretrained(real_model_dir("SmolVLM-256M-Instruct"))


def test_pages_are_batched_and_cut_pages_reported(monkeypatch, smol_processor):
    fake = FakeBatch(
        smol_processor.tokenizer,
        [(PAGE_TEXT, "stop"), (PAGE_FIGURES[:80], "length"), (PAGE_FIGURES, "stop")],
    )
    monkeypatch.setattr(pipeline, "batch_generate", fake)
    images = [(n, page_image(n)) for n in (1, 2, 3)]
    seen = []
    pages = generate_doctags(
        None, smol_processor, images, max_tokens=64, batch_size=2, on_page=seen.append
    )
    assert [len(call["prompts"]) for call in fake.calls] == [2, 1]
    call = fake.calls[0]
    assert call["prompts"] == ["Convert this page to docling."] * 2
    assert call["images"] == [images[0][1], images[1][1]]
    assert call["stop"] == ("</doctag>",)
    assert call["eos_token_ids"] == {49279}  # <end_of_utterance>
    assert call["max_tokens"] == 64
    assert seen == pages
    assert [p.number for p in pages] == [1, 2, 3]
    assert [p.doctags for p in pages] == [PAGE_TEXT, PAGE_FIGURES[:80], PAGE_FIGURES]
    assert [p.problem for p in pages] == [None, "cut at max_tokens (64) before </doctag>", None]


def test_convert_document_keeps_good_pages_and_warns_about_the_others(
    monkeypatch, smol_processor, tmp_path
):
    answers = [(PAGE_TEXT, "stop"), ("<doctag><text>half a sen", "stop"), (PAGE_FIGURES, "stop")]
    monkeypatch.setattr(pipeline, "batch_generate", FakeBatch(smol_processor.tokenizer, answers))
    pdf = make_pdf(tmp_path / "report.pdf", pages=3)
    with pytest.warns(UserWarning, match="page 2: it does not end with </doctag>"):
        document = convert_document(None, smol_processor, pdf)
    assert sorted(document.pages) == [1, 2, 3]
    assert document.export_to_markdown() == MARKDOWN
    assert document.pages[1].size.width == RENDERED[0]

    monkeypatch.setattr(
        pipeline, "batch_generate", FakeBatch(smol_processor.tokenizer, answers[2:])
    )
    assert convert_document(None, smol_processor, pdf, pages="3", doctags=True) == [PAGE_FIGURES]
    monkeypatch.setattr(
        pipeline, "batch_generate", FakeBatch(smol_processor.tokenizer, answers[:1])
    )
    conversion = convert(None, smol_processor, page_image(0))
    assert [p.number for p in conversion.pages] == [1] and conversion.malformed == []
