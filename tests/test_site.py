"""The HTML atlas in the real headless Chromium: every page renders without errors, its links
and images resolve, the index's search and sort work, text is escaped."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import Browser, check_site
from PIL import Image

import crp_toolkit as ct
from crp_toolkit.atlas.figures import FigureStyle, relevance_rgb, save_figure
from crp_toolkit.atlas.sheets import ConceptSheet, concept_sheet_figure
from crp_toolkit.atlas.site import (
    ClassEntry,
    ConceptEntry,
    PrototypeEntry,
    SiteContent,
    write_site,
)
from crp_toolkit.data.training import load_world_model
from crp_toolkit.data.world import CLASSES, ConceptWorld

ODD = "<b>odd</b> & \"quoted\" 'class'"  # a class name that must come out as text


@pytest.fixture(scope="module")
def content(tmp_path_factory) -> SiteContent:
    """A site from the concept-world CNN: per layer, the 4 concepts most relevant over 6 test
    images, with real images, conditional heatmaps and one real concept sheet (PNG and SVG)."""
    world = ConceptWorld(n=6, seed=1)
    x = torch.stack([world[i][0] for i in range(6)])
    analyzer = ct.LRP(ct.canonize(load_world_model()), ct.composites.EpsilonPlusFlat())
    targets = ct.analyze(x, analyzer).target
    names = [ODD if k == int(targets[0]) else name for k, name in enumerate(CLASSES)]
    entries, figures = [], tmp_path_factory.mktemp("figures")
    for layer in ("features.8", "features.12"):
        scores = ct.CRP(analyzer, layer, ct.TopNFeatures(1))(x).scores
        for c in scores.mean(0).topk(4).indices.tolist():
            e = ct.CRP(analyzer, layer, ct.IndexedFeatures(c))(x, targets)
            best = scores[:, c].argsort(descending=True)
            per_class = {names[int(t)]: float(scores[targets == t, c].sum()) for t in targets}
            top = sorted(per_class.items(), key=lambda kv: -kv[1])[:2]
            sheet = []
            if not entries:  # one concept with real figure files
                fig = concept_sheet_figure(ConceptSheet(f"{layer}:{c}", list(x[best[:4]])))
                sheet = save_figure(fig, figures / "sheet", FigureStyle(formats=("png", "svg")))
            entries.append(
                ConceptEntry(
                    layer,
                    c,
                    float(scores[:, c].mean()),
                    thumbnail=x[best[0]],
                    top_classes=top,
                    figures=sheet,
                    references=[relevance_rgb(e.relevance[i, 0]) for i in best[:3].tolist()],
                )
            )
    ranked = sorted(entries, key=lambda e: -e.relevance)
    classes = [
        ClassEntry(
            name,
            [(e.layer, e.concept, r) for e in ranked for n, r in e.top_classes if n == name][:5],
        )
        for name in sorted({n for e in entries for n, _ in e.top_classes})
    ]
    prototype = PrototypeEntry(
        "prototype 0",
        samples=list(x[:3]),
        class_name=classes[0].name,
        concepts=[(e.layer, e.concept, e.relevance) for e in ranked[:3]],
    )
    return SiteContent("concept world <atlas>", entries, classes, [prototype])


@pytest.fixture(scope="module")
def site(content, tmp_path_factory) -> Path:
    return write_site(content, tmp_path_factory.mktemp("site") / "atlas")


@pytest.fixture(scope="module")
def browser():
    with Browser() as b:
        yield b


def test_every_page_renders_with_working_links_and_images(site, content, browser):
    pages = check_site(browser, site)
    assert len(pages) == 1 + len(content.concepts) + len(content.classes) + 1
    sheet = content.concepts[0]
    browser.navigate((site.parent / f"concept-{sheet.layer}-{sheet.concept}.html").as_uri())
    assert browser.evaluate("document.querySelectorAll('.gallery img').length") == 2 + 3


def test_text_is_escaped(site, content, browser):
    odd = next(i for i, k in enumerate(content.classes) if k.name == ODD)
    browser.navigate((site.parent / f"class-{odd:03d}.html").as_uri())
    assert browser.evaluate("document.querySelector('h1').textContent") == ODD
    assert browser.evaluate("document.querySelectorAll('h1 b').length") == 0
    browser.navigate(site.as_uri())
    assert browser.evaluate("document.title") == content.title


def _visible(browser) -> list[str]:
    return browser.evaluate(
        "Array.from(document.querySelectorAll('table.concepts tbody tr'))"
        ".filter(r => !r.hidden).map(r => r.dataset.id)"
    )


def _search(browser, query: str) -> list[str]:
    browser.evaluate(
        f"(s => {{ s.value = {query!r}; s.dispatchEvent(new Event('input')); }})"
        "(document.getElementById('search'))"
    )
    return _visible(browser)


def test_search_filters_rows_by_concept_id_and_class(site, content, browser):
    browser.navigate(site.as_uri())
    ids = [e.id for e in content.concepts]
    assert sorted(_search(browser, "")) == sorted(ids)
    some = content.concepts[1]
    same = {e.id for e in content.concepts if e.concept == some.concept}
    assert set(_search(browser, str(some.concept))) == same
    assert _search(browser, some.id) == [some.id]
    using = {
        k.name: {e.id for e in content.concepts if k.name in dict(e.top_classes)}
        for k in content.classes
    }
    name = next(n for n, found in using.items() if 0 < len(found) < len(ids))
    assert set(_search(browser, name.upper())) == using[name]
    assert set(_search(browser, "features.8")) == {
        e.id for e in content.concepts if e.layer == "features.8"
    }
    assert _search(browser, "no such class") == []
    assert browser.evaluate("document.getElementById('shown').textContent") == (
        f"0 of {len(ids)} concepts"
    )


def _column(browser, key: str, table: int = 1) -> list[float]:
    return browser.evaluate(
        f"Array.from(document.querySelectorAll('table.concepts')[{table}].tBodies[0].rows,"
        f" r => parseFloat(r.dataset.{key}))"
    )


def _click(browser, key: str) -> None:
    browser.evaluate(
        f"document.querySelectorAll('table.concepts')[1].querySelector('[data-key={key}]').click()"
    )


def test_sort_reorders_rows_and_screenshot(site, browser, tmp_path):
    browser.navigate(site.as_uri())
    relevance = _column(browser, "relevance")
    assert relevance == sorted(relevance, reverse=True)  # most relevant first
    _click(browser, "relevance")
    assert _column(browser, "relevance") == sorted(relevance)
    _click(browser, "relevance")
    assert _column(browser, "relevance") == sorted(relevance, reverse=True)
    _click(browser, "concept")
    concepts = _column(browser, "concept")
    assert concepts == sorted(concepts) and concepts != sorted(concepts, reverse=True)
    other = _column(browser, "relevance", table=0)  # sorting one layer leaves the others
    assert other == sorted(other, reverse=True)
    assert browser.problems == []
    shot = browser.screenshot(tmp_path / "index.png")
    image = Image.open(io.BytesIO(shot.read_bytes()))
    assert image.format == "PNG" and min(image.size) > 100
    assert np.asarray(image.convert("L")).std() > 5  # something was drawn


def test_browser_reports_errors_failed_loads_and_exceptions(browser, tmp_path):
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!doctype html><title>bad</title><img src="missing.png"><script>'
        'console.error("logged"); console.warn("only a warning");'
        'setTimeout(() => { throw new Error("later"); }); null.x;</script>'
    )
    browser.navigate(bad.as_uri())
    browser.evaluate("new Promise(done => setTimeout(done, 50))")  # let the timeout fire
    problems = browser.problems
    assert len(problems) == 4, problems
    for seen in ("missing.png", '"logged"', "Uncaught TypeError", "Uncaught Error: later"):
        assert any(seen in p for p in problems), (seen, problems)
    (tmp_path / "good.html").write_text("<!doctype html><title>good</title>")
    browser.navigate((tmp_path / "good.html").as_uri())
    assert browser.problems == []
    with pytest.raises(RuntimeError, match="cannot open"):
        browser.navigate((tmp_path / "absent.html").as_uri())


def test_bad_content_is_refused(content, tmp_path):
    entry = content.concepts[0]
    unknown = ClassEntry("x", [(entry.layer, 999, 1.0)])
    with pytest.raises(ValueError, match="no entry"):
        write_site(SiteContent("t", content.concepts, [unknown]), tmp_path)
    with pytest.raises(ValueError, match="share page"):
        write_site(SiteContent("t", [entry, entry]), tmp_path)
    orphan = PrototypeEntry("p", [entry.thumbnail], class_name="missing")
    with pytest.raises(ValueError, match="class 'missing'"):
        write_site(SiteContent("t", [entry], prototypes=[orphan]), tmp_path)
    missing = ConceptEntry("l", 0, 1.0, thumbnail=tmp_path / "nothing.png")
    with pytest.raises(FileNotFoundError, match="nothing.png"):
        write_site(SiteContent("t", [missing]), tmp_path)
