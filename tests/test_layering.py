"""The package is layered: the stages import one another in one direction, and the command
line's modules without a circle."""

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


STAGES = ("engine", "concepts", "data", "store", "mining", "atlas", "app")


def stage_imports(stage: str) -> set[str]:
    """The pipeline stages (subpackages) whose modules the modules of ``stage`` import, at any
    depth of their code (lazy imports inside functions count too)."""
    found = set()
    for path in (ROOT / "crp_toolkit" / stage).glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            found |= {n.split(".")[1] for n in names if n.startswith("crp_toolkit.")}
    return found & set(STAGES)


def test_data_flows_one_way_through_the_stages():
    """Each stage imports only the stages before it (engine -> concepts -> data -> store ->
    mining -> atlas -> app): no arrow points back against the flow of data."""
    for i, stage in enumerate(STAGES):
        later = stage_imports(stage) & set(STAGES[i + 1 :])
        assert not later, f"crp_toolkit.{stage} imports the later stage(s) {sorted(later)}"
