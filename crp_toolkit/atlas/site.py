"""The HTML atlas: a static site to browse concepts, written into one directory. It opens from
the file system with no server and loads nothing from the network: index.html (each layer's
concepts in a table, sortable and searchable with inline JavaScript), one page per concept,
class and prototype, and the images as files beside them, all linked relatively."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape
from pathlib import Path

import numpy as np
from PIL import Image as PILImage
from torch import Tensor

from crp_toolkit.atlas.figures import as_rgb

# An image of the site: an array or tensor (see figures.Image; written as PNG), or the path of
# an image file (a saved figure; copied into the site).
ImageSource = np.ndarray | Tensor | str | Path
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".svg", ".webp")


@dataclass(frozen=True)
class ConceptEntry:
    """One concept of a layer: its dataset-level relevance, a thumbnail for tables, the
    classes that use it most as (class name, relevance) pairs, its figures (concept sheet,
    ...) and its reference images."""

    layer: str
    concept: int
    relevance: float
    thumbnail: ImageSource
    top_classes: Sequence[tuple[str, float]] = ()
    figures: Sequence[ImageSource] = ()
    references: Sequence[ImageSource] = ()
    label: str = ""  # its best name in an annotated probe set and the score, if known

    @property
    def id(self) -> str:
        return f"{self.layer}:{self.concept}"


@dataclass(frozen=True)
class ClassEntry:
    """One class: its most relevant concepts as (layer, concept, relevance), most first, and
    its figures (concept importance, ...)."""

    name: str
    concepts: Sequence[tuple[str, int, float]]
    figures: Sequence[ImageSource] = ()


@dataclass(frozen=True)
class PrototypeEntry:
    """One prototype: its nearest samples, its class (when it belongs to one), the concepts of
    its profile as (layer, concept, relevance) and its figures."""

    name: str
    samples: Sequence[ImageSource]
    class_name: str | None = None
    concepts: Sequence[tuple[str, int, float]] = ()
    figures: Sequence[ImageSource] = ()


@dataclass(frozen=True)
class SiteContent:
    """Everything the atlas shows; concepts, classes and prototypes refer to each other by
    concept id ``layer:concept`` and by class name."""

    title: str
    concepts: Sequence[ConceptEntry]
    classes: Sequence[ClassEntry] = ()
    prototypes: Sequence[PrototypeEntry] = ()


def slug(text: str) -> str:
    """A file-name-safe form of ``text`` (letters, digits, ``.``, ``_``, ``-``)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "_"


def layer_anchor(layer: str) -> str:
    """The id of a layer's section in index.html."""
    return f"layer-{slug(layer)}"


def concept_page(layer: str, concept: int) -> str:
    return f"concept-{slug(layer)}-{concept}.html"


def class_page(index: int) -> str:
    return f"class-{index:03d}.html"


def prototype_page(index: int) -> str:
    return f"prototype-{index:03d}.html"


def check_content(content: SiteContent) -> None:
    """Refuse content whose pages would collide or whose cross references lead nowhere."""
    pages: dict[str, str] = {}
    for c in content.concepts:
        page = concept_page(c.layer, c.concept)
        if page in pages:
            raise ValueError(f"concepts {pages[page]!r} and {c.id!r} would share page {page}")
        pages[page] = c.id
    known = set(pages.values())
    for kind, items in (("class", content.classes), ("prototype", content.prototypes)):
        names = [item.name for item in items]
        if len(set(names)) != len(names):
            raise ValueError(f"{kind} names must be unique, got {names}")
        for item in items:
            missing = [f"{la}:{c}" for la, c, _ in item.concepts if f"{la}:{c}" not in known]
            if missing:
                raise ValueError(f"{kind} {item.name!r} lists concepts with no entry: {missing}")
    classes = {c.name for c in content.classes}
    for p in content.prototypes:
        if p.class_name is not None and p.class_name not in classes:
            raise ValueError(f"prototype {p.name!r} names class {p.class_name!r} with no entry")


def write_image(source: ImageSource, directory: Path, stem: str) -> str:
    """Put one image into ``directory`` as ``stem`` plus its suffix; returns its file name.
    Arrays become PNG files, image files are copied."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"image file {path} does not exist")
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"{path} is not an image a browser shows ({IMAGE_SUFFIXES})")
        name = f"{stem}{path.suffix.lower()}"
        shutil.copyfile(path, directory / name)
        return name
    name = f"{stem}.png"
    rgb = (as_rgb(source) * 255).round().astype(np.uint8)
    PILImage.fromarray(rgb).save(directory / name)
    return name


def write_site(content: SiteContent, directory: str | Path) -> Path:
    """Write the atlas into ``directory`` (created if needed; files of the same names are
    replaced); returns the path of index.html."""
    check_content(content)
    root = Path(directory)
    images = root / "img"
    images.mkdir(parents=True, exist_ok=True)
    class_pages = {c.name: class_page(i) for i, c in enumerate(content.classes)}
    thumbs = {}
    for c in content.concepts:
        stem = Path(concept_page(c.layer, c.concept)).stem
        thumbs[c.id] = "img/" + write_image(c.thumbnail, images, f"{stem}-thumb")
        body = _concept_body(
            c,
            _gallery(c.figures, images, f"{stem}-fig"),
            _gallery(c.references, images, f"{stem}-ref"),
            class_pages,
        )
        _write(root / concept_page(c.layer, c.concept), content.title, c.id, body)
    for i, k in enumerate(content.classes):
        body = _class_body(k, _gallery(k.figures, images, f"class-{i:03d}-fig"), thumbs)
        _write(root / class_page(i), content.title, k.name, body)
    for i, p in enumerate(content.prototypes):
        body = _prototype_body(
            p,
            _gallery(p.samples, images, f"prototype-{i:03d}-sample"),
            _gallery(p.figures, images, f"prototype-{i:03d}-fig"),
            class_pages,
            thumbs,
        )
        _write(root / prototype_page(i), content.title, p.name, body)
    index = root / "index.html"
    _write(index, content.title, None, _index_body(content, thumbs, class_pages), SCRIPT)
    return index


def _gallery(sources: Sequence[ImageSource], directory: Path, stem: str) -> str:
    """The images as one row of <img> elements (empty when there are none)."""
    names = [write_image(s, directory, f"{stem}-{j}") for j, s in enumerate(sources)]
    imgs = "".join(f'<img src="img/{escape(n)}" alt="">' for n in names)
    return f'<div class="gallery">{imgs}</div>' if names else ""


def _link(href: str | None, text: str) -> str:
    return f'<a href="{escape(href)}">{escape(text)}</a>' if href else escape(text)


def _section(title: str, content: str) -> str:
    return f"<h2>{escape(title)}</h2>{content}" if content else ""


def _concept_rows(concepts: Sequence[tuple[str, int, float]], thumbs: dict[str, str]) -> str:
    """A table of (layer, concept, relevance) with thumbnails linking to concept pages."""
    rows = "".join(
        f'<tr><td><a href="{escape(concept_page(la, c))}"><img class="thumb" '
        f'src="{escape(thumbs[f"{la}:{c}"])}" alt=""></a></td>'
        f"<td>{_link(concept_page(la, c), f'{la}:{c}')}</td><td>{r:.4g}</td></tr>"
        for la, c, r in concepts
    )
    head = "<tr><th></th><th>concept</th><th>relevance</th></tr>"
    return f"<table><thead>{head}</thead><tbody>{rows}</tbody></table>" if rows else ""


def _concept_body(
    c: ConceptEntry, figures: str, references: str, class_pages: dict[str, str]
) -> str:
    classes = "".join(
        f"<tr><td>{_link(class_pages.get(name), name)}</td><td>{r:.4g}</td></tr>"
        for name, r in c.top_classes
    )
    table = f"<table><tbody>{classes}</tbody></table>" if classes else ""
    back = f"index.html#{layer_anchor(c.layer)}"
    label = f" &middot; label {escape(c.label)}" if c.label else ""
    return (
        f"<p>{_link(back, c.layer)} &middot; relevance {c.relevance:.4g}{label}</p>"
        f"{figures}{_section('references', references)}{_section('top classes', table)}"
    )


def _class_body(k: ClassEntry, figures: str, thumbs: dict[str, str]) -> str:
    return f"{figures}{_section('most relevant concepts', _concept_rows(k.concepts, thumbs))}"


def _prototype_body(
    p: PrototypeEntry,
    samples: str,
    figures: str,
    class_pages: dict[str, str],
    thumbs: dict[str, str],
) -> str:
    cls = f"<p>class {_link(class_pages[p.class_name], p.class_name)}</p>" if p.class_name else ""
    return (
        f"{cls}{_section('nearest samples', samples)}{figures}"
        f"{_section('concepts', _concept_rows(p.concepts, thumbs))}"
    )


def _index_body(content: SiteContent, thumbs: dict[str, str], class_pages: dict[str, str]) -> str:
    layers: dict[str, list[ConceptEntry]] = {}
    for c in content.concepts:
        layers.setdefault(c.layer, []).append(c)
    nav = "".join(
        f'<li><a href="#{escape(layer_anchor(la))}">{escape(la)}</a> ({len(cs)} concepts)</li>'
        for la, cs in layers.items()
    )
    search = (
        '<p><input id="search" type="search" placeholder="concept id (5 or features.12:5), '
        'layer or class" aria-label="search concepts"> <span id="shown"></span></p>'
    )
    tables = "".join(_layer_table(la, cs, thumbs, class_pages) for la, cs in layers.items())
    classes = "".join(f"<li>{_link(class_pages[k.name], k.name)}</li>" for k in content.classes)
    protos = "".join(
        f"<li>{_link(prototype_page(i), p.name)}</li>" for i, p in enumerate(content.prototypes)
    )
    return (
        f'<h2>layers</h2><ul id="layers">{nav}</ul>{search}{tables}'
        f"{_section('classes', f'<ul>{classes}</ul>' if classes else '')}"
        f"{_section('prototypes', f'<ul>{protos}</ul>' if protos else '')}"
    )


def _layer_table(
    layer: str, concepts: list[ConceptEntry], thumbs: dict[str, str], class_pages: dict[str, str]
) -> str:
    """One layer's concepts, most relevant first; rows carry the data the script filters and
    sorts by."""
    rows = []
    for c in sorted(concepts, key=lambda c: -c.relevance):
        names = [name for name, _ in c.top_classes]
        top = ", ".join(_link(class_pages.get(name), name) for name in names)
        page = concept_page(c.layer, c.concept)
        rows.append(
            f'<tr data-id="{escape(c.id)}" data-concept="{c.concept}" '
            f'data-relevance="{c.relevance!r}" '
            f'data-classes="{escape(json.dumps([n.lower() for n in names]))}">'
            f'<td>{_link(page, str(c.concept))}</td><td><a href="{escape(page)}">'
            f'<img class="thumb" src="{escape(thumbs[c.id])}" alt="{escape(c.id)}"></a></td>'
            f"<td>{c.relevance:.4g}</td><td>{escape(c.label)}</td><td>{top}</td></tr>"
        )
    head = (
        '<tr><th><button class="sort" data-key="concept" data-first="asc">concept</button>'
        "</th><th></th>"
        '<th aria-sort="descending"><button class="sort" data-key="relevance" '
        'data-first="desc" data-order="desc">relevance</button></th><th>label</th>'
        "<th>top classes</th></tr>"
    )
    return (
        f'<h2 id="{escape(layer_anchor(layer))}">{escape(layer)}</h2><table class="concepts">'
        f"<thead>{head}</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _write(path: Path, site_title: str, title: str | None, body: str, script: str = "") -> None:
    heading = escape(title if title is not None else site_title)
    full = escape(f"{title} - {site_title}" if title is not None else site_title)
    nav = "" if title is None else '<nav><a href="index.html">index</a></nav>'
    script = f"<script>{script}</script>" if script else ""
    path.write_text(
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{full}</title><style>{STYLE}</style></head><body>{nav}<h1>{heading}</h1>"
        f"{body}{script}</body></html>\n",
        encoding="utf-8",
    )


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 70em; padding: 0 1em; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border-bottom: 1px solid #ddd; padding: 0.25em 0.6em; text-align: left; }
th button { font: inherit; font-weight: bold; background: none; border: none; cursor: pointer; }
th[aria-sort=ascending] button::after { content: " \\2191"; }
th[aria-sort=descending] button::after { content: " \\2193"; }
img.thumb { width: 48px; height: 48px; object-fit: contain; image-rendering: pixelated; }
.gallery img { max-width: 100%; margin: 0.2em; vertical-align: top; }
.gallery img[src*="-ref-"], .gallery img[src*="-sample-"] { width: 96px; }
input#search { width: 24em; padding: 0.3em; }
"""

# Search: digits match a concept id exactly, text with ':' a prefix of "layer:concept", other
# text a part of a class or layer name. Sort: the buttons order their table's rows by their key,
# first in the button's data-first order, then toggling.
SCRIPT = """
(function () {
  "use strict";
  var rows = Array.prototype.slice.call(document.querySelectorAll("table.concepts tbody tr"));
  var search = document.getElementById("search");
  var shown = document.getElementById("shown");
  function matches(row, q) {
    if (!q) { return true; }
    var id = row.dataset.id.toLowerCase();
    if (/^[0-9]+$/.test(q)) { return row.dataset.concept === q; }
    if (q.indexOf(":") >= 0) { return id.indexOf(q) === 0; }
    var layer = id.slice(0, id.lastIndexOf(":"));
    return layer.indexOf(q) >= 0 || JSON.parse(row.dataset.classes).some(function (c) {
      return c.indexOf(q) >= 0;
    });
  }
  function filter() {
    var q = search.value.trim().toLowerCase(), n = 0;
    rows.forEach(function (row) {
      var ok = matches(row, q);
      row.hidden = !ok;
      n += ok ? 1 : 0;
    });
    shown.textContent = n + " of " + rows.length + " concepts";
  }
  document.querySelectorAll("button.sort").forEach(function (button) {
    button.addEventListener("click", function () {
      var th = button.parentNode, table = th.closest("table"), body = table.tBodies[0];
      var key = button.dataset.key, order = button.dataset.order;
      var desc = order ? order === "asc" : button.dataset.first === "desc";
      table.querySelectorAll("button.sort").forEach(function (b) {
        delete b.dataset.order;
        b.parentNode.removeAttribute("aria-sort");
      });
      button.dataset.order = desc ? "desc" : "asc";
      th.setAttribute("aria-sort", desc ? "descending" : "ascending");
      Array.prototype.slice.call(body.rows).sort(function (a, b) {
        var d = parseFloat(a.dataset[key]) - parseFloat(b.dataset[key]);
        return desc ? -d : d;
      }).forEach(function (row) { body.appendChild(row); });
    });
  });
  search.addEventListener("input", filter);
  filter();
})();
"""

__all__ = [
    "ClassEntry",
    "ConceptEntry",
    "ImageSource",
    "PrototypeEntry",
    "SiteContent",
    "write_site",
]
