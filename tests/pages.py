"""Test documents and pictures: multi-page PDFs and pictures drawn with Pillow, DocTags pages."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw

# A US-letter page in PDF points (72 per inch).
PAGE_POINTS = (612, 792)

# Every DocTags element the models write, with locations on the 0-500 grid.
PAGE_TEXT = (
    "<doctag>"
    "<page_header><loc_40><loc_10><loc_200><loc_18>ACME Corp.</page_header>"
    "<title><loc_50><loc_20><loc_450><loc_40>Annual Report</title>"
    "<section_header_level_1><loc_50><loc_50><loc_300><loc_60>1 Introduction"
    "</section_header_level_1>"
    "<text><loc_50><loc_70><loc_450><loc_90>This report covers the year.</text>"
    "<unordered_list>"
    "<list_item><loc_60><loc_100><loc_300><loc_110>First point</list_item>"
    "<list_item><loc_60><loc_112><loc_300><loc_122>Second point</list_item>"
    "</unordered_list>"
    "<otsl><loc_50><loc_130><loc_450><loc_200>"
    "<ched>Name<ched>Value<nl><fcel>alpha<fcel>1<nl><fcel>beta<fcel>2<nl></otsl>"
    "<page_footer><loc_240><loc_480><loc_260><loc_490>1</page_footer>"
    "</doctag>"
)
PAGE_FIGURES = (
    "<doctag>"
    "<section_header_level_2><loc_50><loc_20><loc_300><loc_30>1.1 Code and maths"
    "</section_header_level_2>"
    "<code><loc_50><loc_40><loc_450><loc_80><_Python_>print('hi')</code>"
    "<formula><loc_50><loc_90><loc_450><loc_110>E = m c^2</formula>"
    "<picture><loc_100><loc_200><loc_300><loc_400><logo>"
    "<caption><loc_100><loc_405><loc_300><loc_420>Figure 1: A red square</caption></picture>"
    "</doctag>"
)

# What docling-core makes of the two pages above.
MARKDOWN = """# Annual Report

## 1 Introduction

This report covers the year.

- First point
- Second point

| Name   |   Value |
|--------|---------|
| alpha  |       1 |
| beta   |       2 |

### 1.1 Code and maths

```
print('hi')
```

$$E = m c^2$$

Figure 1: A red square

<!-- image -->

Logo"""
HTML_BODY = [
    "<h1>Annual Report</h1>",
    "<h2>1 Introduction</h2>",
    "<p>This report covers the year.</p>",
    "<ul>\n<li>First point</li>\n<li>Second point</li>\n</ul>",
    "<table><tbody><tr><td>Name</td><td>Value</td></tr><tr><td>alpha</td><td>1</td></tr>"
    "<tr><td>beta</td><td>2</td></tr></tbody></table>",
    "<h3>1.1 Code and maths</h3>",
    "<pre><code>print('hi')</code></pre>",
    '<annotation encoding="TeX">E = m c^2</annotation>',
    '<figcaption><div class="caption">Figure 1: A red square</div></figcaption>',
]


def page_image(index: int, size: tuple[int, int] = PAGE_POINTS) -> Image.Image:
    """A page with a header bar, a red square where PAGE_FIGURES puts its picture, and a number."""
    width, height = size
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, width, height // 25), fill=(20, 40, 120))
    # <loc_100><loc_200><loc_300><loc_400> on the 0-500 grid.
    draw.rectangle((width // 5, height * 2 // 5, width * 3 // 5, height * 4 // 5), fill=(220, 0, 0))
    draw.text((width // 10, height // 10), f"Page {index + 1}", fill="black")
    return image


def make_pdf(path: Path, pages: int = 3) -> Path:
    """A PDF of `pages` US-letter pages, written by Pillow at 72 dpi (one pixel per point)."""
    images = [page_image(i) for i in range(pages)]
    images[0].save(path, format="PDF", save_all=True, append_images=images[1:], resolution=72)
    return path


def make_encrypted_pdf(path: Path) -> Path:
    """A PDF that asks for a password (a standard security handler no empty password opens)."""
    make_pdf(path, pages=1)
    security = (
        (b"/Encrypt << /Filter /Standard /V 1 /R 2 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32)
        + b"> /P -4 >>\n/ID [<"
        + b"33" * 16
        + b"> <"
        + b"33" * 16
        + b">]\n"
    )
    path.write_bytes(path.read_bytes().replace(b"/Info", security + b"/Info"))
    return path


def picture(width: int = 700, height: int = 500) -> Image.Image:
    """A picture of a yellow disc and a red bar on blue, for prompts about an image."""
    image = Image.new("RGB", (width, height), (30, 90, 160))
    draw = ImageDraw.Draw(image)
    draw.ellipse((100, 80, 400, 380), fill=(240, 200, 40))
    draw.rectangle((450, 50, 650, 450), fill=(200, 30, 60))
    return image
