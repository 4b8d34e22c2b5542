"""The two domains a relevance pass carries values in, and what each layer reads in them.

In the *relevance* domain the pass carries relevance ``R`` and every rule forms the relevance
at its inputs (an epsilon rule divides by its layer's output and multiplies by its input).
In the *gradient* domain it carries ``G`` with ``R = z * G`` at each layer's output ``z``:
input times a modified gradient, as LXT computes LRP-0. A rule's gradient form
(``Rule.gradient_in``) then reads less of the forward pass (an LRP-0 dense layer or sum reads
nothing), and relevance is formed (``a * G``) only where it is recorded or returned.

Relevance given to a pass enters the gradient domain at the first layer whose rule divides
by its output (``Rule.divides_by_output``: ``G = R / z`` is then exactly what the rule
computes); rules that pass relevance on unchanged (activations, routing) carry it in the
relevance domain until then. Where the two meet at a layer, ``G`` is turned into relevance
there. So the two domains give the same relevance, up to rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence

from torch import Tensor

from crp_toolkit.engine.graph import Graph
from crp_toolkit.engine.memory import reached_layers
from crp_toolkit.engine.rules import Reads, Rule

DOMAINS = ("auto", "gradient", "relevance")


def resolve(domain: str, graph: Graph, rules: Sequence[Rule]) -> str:
    """The domain asked for, "auto" resolved: "gradient" where every layer's rule has a
    gradient form (``Rule.gradient_reads``), else "relevance"."""
    if domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS}, got {domain!r}")
    if domain == "relevance":
        return domain
    lacking = [
        f"{layer.name!r} ({rule!r})"
        for layer, rule in zip(graph.layers, rules, strict=True)
        if rule.gradient_reads(layer) is None
    ]
    if lacking and domain == "gradient":
        raise ValueError(
            f"domain='gradient' needs a gradient form for every layer's rule; {len(lacking)} "
            f"have none, e.g. {', '.join(lacking[:3])}. Stabilizer-free rules and routing "
            "have one (EpsilonRule(0), CPLRP(epsilon=0)); or use domain='relevance'"
        )
    return "relevance" if lacking else "gradient"


def relevance_layers(
    graph: Graph, rules: Sequence[Rule], passes: Sequence[tuple[int, ...]], starts: Collection[int]
) -> set[int]:
    """The layers a gradient-domain pass from ``starts`` may reach with relevance (not yet
    ``G``): the starts, and the inputs of those whose rules do not divide by their output."""
    undivided = [
        () if rule.divides_by_output(layer) else passed
        for layer, rule, passed in zip(graph.layers, rules, passes, strict=True)
    ]
    return {i for i in reached_layers(graph, undivided, starts) if i >= 0}


def layer_reads(
    graph: Graph, rules: Sequence[Rule], domain: str, relevance: Collection[int] = ()
) -> list[Reads]:
    """What each layer's rule reads in ``domain``; in the gradient domain, a layer that may
    get relevance (``relevance``) also reads its output (to enter the gradient domain, or to
    form relevance from ``G`` arriving there too) and, unless its rule divides by its
    output (and so always takes its gradient form), what its relevance form reads."""
    reads = []
    for layer, rule in zip(graph.layers, rules, strict=True):
        plain = (rule.reads_inputs(layer), rule.reads_output(layer), rule.reads_input_values(layer))
        if domain != "gradient":
            reads.append(plain)
            continue
        gradient: Reads = rule.gradient_reads(layer)  # type: ignore[assignment]
        if layer.index in relevance:
            gradient = _union(gradient, (False, True, False))
            if not rule.divides_by_output(layer):
                gradient = _union(gradient, plain)
        reads.append(gradient)
    return reads


def _union(a: Reads, b: Reads) -> Reads:
    """What either of two rules' reads reads."""
    if not a[0] or not b[0]:
        values = a[2] if a[0] else b[2]
    elif a[2] is True or b[2] is True:
        values = True
    else:
        values = tuple(sorted(set(a[2] or ()) | set(b[2] or ())))
    return a[0] or b[0], a[1] or b[1], values


def entered(R: Tensor, z: Tensor) -> Tensor:
    """``G = R / z`` at a layer whose rule divides by its output ``z``; 0 where ``z = 0``,
    where a stabilizer-free rule has nothing to divide by."""
    return (R / z).masked_fill_(z == 0, 0.0)


class Pending:
    """Relevance waiting at layers' outputs during a pass, each entry ``R`` or ``G``
    (``R = z * G``); ``value(index)`` gives a layer's output, to form relevance from ``G``
    where both arrive at one layer and where relevance leaves the pass."""

    def __init__(self, relevance: dict[int, Tensor], value: Callable[[int], Tensor]) -> None:
        self._entries = dict(relevance)
        self._gradient: set[int] = set()
        self._value = value

    def __iter__(self) -> Iterator[int]:
        return iter(self._entries)

    def pop(self, index: int) -> tuple[Tensor | None, bool]:
        """The entry at ``index`` (None if none) and whether it is ``G``."""
        if index in self._gradient:
            self._gradient.discard(index)
            return self._entries.pop(index), True
        return self._entries.pop(index, None), False

    def add(self, index: int, value: Tensor, gradient: bool) -> None:
        """Add ``value`` (``G`` if ``gradient``, else relevance) to the entry at ``index``."""
        if index not in self._entries:
            self._entries[index] = value
            if gradient:
                self._gradient.add(index)
            return
        if gradient == (index in self._gradient):
            self._entries[index] = self._entries[index] + value
            return
        if gradient:  # relevance waits here: form it from G
            value = self._value(index) * value
        else:
            self._entries[index] = self._value(index) * self._entries[index]
            self._gradient.discard(index)
        self._entries[index] = self._entries[index] + value

    def clear(self) -> None:
        self._entries.clear()
        self._gradient.clear()

    def relevance(self) -> dict[int, Tensor]:
        """Every entry as relevance."""
        return {
            i: self._value(i) * v if i in self._gradient else v for i, v in self._entries.items()
        }
