"""The command line's modules import one another without a circle."""

from __future__ import annotations

import ast

from conftest import ROOT

APP = ROOT / "crp_toolkit" / "app"


def app_imports() -> dict[str, set[str]]:
    """Per module of crp_toolkit/app, the app modules it imports (at any depth of its code)."""
    names = {path.stem for path in APP.glob("*.py")}
    graph = {}
    for path in APP.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "crp_toolkit.app":
                found |= {alias.name for alias in node.names if alias.name in names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "crp_toolkit.app."
            ):
                found.add(node.module.split(".")[2])
        graph[path.stem] = found - {path.stem}
    return graph


def test_the_app_has_no_import_circle():
    graph, done = app_imports(), []
    while graph:  # peel modules whose imports are all peeled: a circle would be left over
        ready = sorted(name for name, deps in graph.items() if deps <= set(done))
        assert ready, f"import circle among {sorted(graph)}"
        done += ready
        graph = {name: deps for name, deps in graph.items() if name not in ready}
    assert done.index("context") < done.index("mine") < done.index("atlas") < done.index("stages")
