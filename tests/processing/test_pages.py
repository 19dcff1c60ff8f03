"""The one page-source module: finding PDFs and images, opening PDFs, rendering, page ranges."""

from __future__ import annotations

import sys

import pytest
from pages import make_pdf, page_image

from mlx_smolvlm.processing.pages import find_files, open_source, pdf_page_count, render_pdf_page


def test_folders_are_searched_recursively_in_name_order(tmp_path):
    (tmp_path / "b" / "deeper").mkdir(parents=True)
    make_pdf(tmp_path / "b" / "deeper" / "report.pdf", pages=2)
    page_image(0).save(tmp_path / "a.png")
    (tmp_path / "b" / "notes.txt").write_text("not a page")
    named = tmp_path / "notes.txt"
    named.write_text("named files are kept; their readers judge them")
    found = find_files([tmp_path, named])
    assert found == [tmp_path / "a.png", tmp_path / "b" / "deeper" / "report.pdf", named]
    assert pdf_page_count(found[1]) == 2
    small, large = (render_pdf_page(found[1], 2, dpi) for dpi in (36, 72))
    assert large.mode == "RGB" and large.size == (2 * small.width, 2 * small.height)


def test_missing_inputs_and_empty_folders_are_named(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="^nowhere: no such file or folder$"):
        find_files(["nowhere"])
    with pytest.raises(FileNotFoundError, match="empty: the folder holds no PDF or image files$"):
        find_files([tmp_path / "empty"])


def test_a_pdf_without_pypdfium2_names_the_extra_to_install(tmp_path, monkeypatch):
    pdf = make_pdf(tmp_path / "doc.pdf", pages=1)
    monkeypatch.setitem(sys.modules, "pypdfium2", None)  # import pypdfium2 now fails
    with pytest.raises(
        ImportError, match=r'needs pypdfium2.*pip install "mlx-smolvlm\[retrieval\]"'
    ):
        open_source(pdf)
