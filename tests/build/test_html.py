"""The HTML report: self-contained (no script, no external resource), well formed, and it
renders in a real headless browser where one is installed (as issue #21 asks)."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from xml.etree import ElementTree

import pytest

from onnxopt.cli import main

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def built_page(recipe: Path, capsys) -> str:
    assert main(["build", str(recipe)]) == 0, capsys.readouterr()
    capsys.readouterr()
    return (recipe.parent / "out" / "summary.html").read_text()


def test_page_is_self_contained_with_the_tables_and_charts(recipe: Path, capsys) -> None:
    page = built_page(recipe, capsys)
    assert "<script" not in page and "<link" not in page and "<img" not in page
    assert not re.search(r"\b(src|href)\s*=", page)
    # the only URLs are SVG's namespace names, which are never fetched
    assert set(re.findall(r"https?://[^\"' ]+", page)) <= {"http://www.w3.org/2000/svg"}
    for name in ("digits", "chain", "res"):
        assert f"<h2>{name} " in page
    assert "prune: channels kept per group" in page  # res is pruned
    assert "quantize: SQNR of each quantized node" in page  # chain is quantized
    assert "Gates: min_agreement = 0.5" in page and "MACs per sample" in page
    assert page.count("<table>") == 1 + 2 * 3  # the summary; per model: diff and passes


VOID = {"meta", "br", "hr", "img", "input", "link", "col", "wbr", "area", "base", "source"}


class _Nesting(HTMLParser):
    """Records tags that close out of order or never close."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag not in VOID:
            self.open.append(tag)

    def handle_startendtag(self, tag: str, attrs) -> None:
        pass  # <x/> opens nothing

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1:] or 'nothing'}")
            return
        self.open.pop()


def test_page_is_well_formed_and_its_charts_parse_as_svg(recipe: Path, capsys) -> None:
    """Every tag closes in order (a browser would not have to repair the page), and each
    inline chart is a well-formed SVG document with drawn elements."""
    page = built_page(recipe, capsys)
    nesting = _Nesting()
    nesting.feed(page)
    nesting.close()
    assert nesting.errors == [] and nesting.open == []
    charts = re.findall(r"<svg\b.*?</svg>", page, flags=re.S)
    assert len(charts) >= 2
    for chart in charts:
        root = ElementTree.fromstring(chart)
        assert root.tag.endswith("svg")
        drawn = [e for e in root.iter() if e.tag.split("}")[-1] in ("rect", "line", "path",
                                                                  "circle", "polyline")]
        assert drawn, chart[:200]


def test_page_renders_in_a_headless_browser(recipe: Path, capsys, tmp_path: Path) -> None:
    browser = next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        pytest.skip("no Chromium or Chrome installed (apt-get install chromium)")
    built_page(recipe, capsys)
    page = recipe.parent / "out" / "summary.html"
    flags = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert dom.count("<svg") >= 2 and "<h2>chain " in dom  # parsed, charts in the DOM
    shot = tmp_path / "shot.png"
    subprocess.run([*flags, "--window-size=1000,900", f"--screenshot={shot}",
                    page.as_uri()], capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (900, 1000)
    # not a blank page: text and bars give many distinct colours
    colours = {tuple(p) for p in (pixels[::7, ::7, :3] * 255).astype(int).reshape(-1, 3)}
    assert len(colours) > 20
