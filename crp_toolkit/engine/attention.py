"""Attention canonizer: attention written out as explicit ops (projections, q scaled times ``k^T``,
softmax, attention times v, output projection), so that every product and the softmax is a
layer of its own with its own rule (AttnLRP, CP-LRP).

``explicit_attention(model)`` replaces every ``nn.MultiheadAttention`` by
:class:`ExplicitAttention` in a structural copy of the model (only the modules on the way to
an attention module are copied; parameters and every other module are shared), each checked
to compute the same function as the module it replaces; torchvision Swin's window attention
likewise (``crp_toolkit.engine.window_attention``). ``explicit_sdpa(graph)`` rewrites the
calls of ``F.scaled_dot_product_attention`` in a traced graph (timm's fused attention) into
the same ops. What either cannot write out is refused, naming where it is; nothing is passed
as identity.
"""

from __future__ import annotations

import copy
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import Tensor, nn

from crp_toolkit.engine.ops import UnsupportedLayerError, current_ops
from crp_toolkit.engine.window_attention import (
    ExplicitWindowAttention,
    is_window_attention,
    shared_linear,
)

_HOW = (
    "write the attention with explicit ops in forward (matmul, softmax) or register an op "
    "for the module with crp_toolkit.engine.ops.register_module_op"
)


class ExplicitAttention(nn.Module):
    """``nn.MultiheadAttention`` (no masks) as explicit ops, sharing the module's parameters:
    ``q_proj``, ``k_proj``, ``v_proj`` are Linears over its q, k, v weights (slices of the
    packed weight, sharing its memory, or the separate ones), ``out_proj`` is its own. Three
    projections rather than one packed: a rule that hands relevance to v alone (CP-LRP)
    reaches only ``v_proj``, and the relevance pass never multiplies zeros."""

    def __init__(self, mha: nn.MultiheadAttention, path: str) -> None:
        super().__init__()
        refusal = _undecomposable(mha)
        if refusal:
            raise UnsupportedLayerError(
                f"cannot write out the attention module {path!r} (MultiheadAttention): "
                f"{refusal}; {_HOW}"
            )
        self.path = path
        self.num_heads = mha.num_heads
        self.batch_first = mha.batch_first
        self.scale = float(mha.head_dim) ** -0.5
        if mha._qkv_same_embed_dim:
            weights = _slices(mha.in_proj_weight)
        else:
            weights = (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        biases = (None,) * 3 if mha.in_proj_bias is None else _slices(mha.in_proj_bias)
        self.q_proj, self.k_proj, self.v_proj = (
            shared_linear(w, b) for w, b in zip(weights, biases, strict=True)
        )
        self.out_proj = mha.out_proj

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise UnsupportedLayerError(
                f"attention module {self.path!r} is called with a mask; masked attention is "
                f"not written out yet; {_HOW}"
            )
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        q, k, v = self.q_proj(query), self.k_proj(key), self.v_proj(value)
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2) for t in (q, k, v))
        weights = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)  # scale the smaller
        out = self.out_proj((weights @ v).transpose(1, 2).flatten(2))
        out = out if self.batch_first else out.transpose(0, 1)
        if not need_weights:
            return out, None
        return out, weights.mean(1) if average_attn_weights else weights


def _slices(packed: nn.Parameter) -> tuple[nn.Parameter, ...]:
    """The q, k and v thirds of a packed parameter, as parameters sharing its memory (and
    its version counter, so cached modified weights see updates)."""
    return tuple(nn.Parameter(part, requires_grad=packed.requires_grad) for part in packed.chunk(3))


def _undecomposable(mha: nn.MultiheadAttention) -> str:
    """Why ``mha`` cannot be written out, or '' if it can."""
    if mha.bias_k is not None or mha.bias_v is not None:
        return "it has bias_k/bias_v (add_bias_kv=True)"
    if mha.add_zero_attn:
        return "it has add_zero_attn=True"
    return ""


def explicit_attention(model: nn.Module) -> nn.Module:
    """``model`` itself if it has no attention to rewrite, else a structural copy in which
    every ``nn.MultiheadAttention`` the op registry does not know is an
    :class:`ExplicitAttention` (checked to compute the same function), and every module with
    ``fused_attn = False`` (timm's switch; its unfused path calls mask helpers that are opaque
    to tracing) has it on, so that its ``F.scaled_dot_product_attention`` is written out by
    ``explicit_sdpa``; torchvision Swin's window attention is an
    :class:`~crp_toolkit.engine.window_attention.ExplicitWindowAttention` (checked likewise).
    The caller's model is not modified."""
    registry = current_ops()
    replacements: dict[str, nn.Module] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) and registry.for_module(module) is None:
            replacements[path] = _checked(module, path)
        elif is_window_attention(module):
            replacements[path] = _checked_windows(module, path)
        elif getattr(module, "fused_attn", None) is False:
            replacements[path] = copy.copy(module)
            replacements[path].fused_attn = True
    return _with_replaced(model, replacements) if replacements else model


def _checked(mha: nn.MultiheadAttention, path: str) -> ExplicitAttention:
    """The explicit form of ``mha``, refused loudly unless it computes the same function on a
    random input (in eval mode)."""
    explicit = ExplicitAttention(mha, path)
    reference = copy.deepcopy(mha).eval() if mha.training else mha
    p = mha.out_proj.weight
    shape = (2, 5, mha.embed_dim) if mha.batch_first else (5, 2, mha.embed_dim)
    generator = torch.Generator(device=p.device).manual_seed(0)
    x = torch.randn(shape, dtype=p.dtype, device=p.device, generator=generator)
    with torch.no_grad():
        want = reference(x, x, x, need_weights=False)[0]
        got = explicit(x, x, x, need_weights=False)[0]
    error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
    if not error <= 1e3 * torch.finfo(p.dtype).eps:
        raise UnsupportedLayerError(
            f"the explicit form of attention module {path!r} does not compute what the module "
            f"does (relative difference {error:.3g}); {_HOW}"
        )
    return explicit


def _checked_windows(attention: nn.Module, path: str) -> nn.Module:
    """Swin's window attention written out, refused loudly unless it computes the module's
    function on random maps with and without padding."""
    explicit = ExplicitWindowAttention(attention)
    reference = copy.deepcopy(attention).eval() if attention.training else attention
    p, (wh, ww) = attention.proj.weight, attention.window_size
    generator = torch.Generator(device=p.device).manual_seed(0)
    for h, w in ((2 * wh, 2 * ww), (wh + 2, ww + 1)):
        x = torch.randn(2, h, w, p.shape[1], dtype=p.dtype, device=p.device, generator=generator)
        with torch.no_grad():
            want, got = reference(x), explicit(x)
        error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
        if not error <= 1e3 * torch.finfo(p.dtype).eps:
            raise UnsupportedLayerError(
                f"the explicit form of window attention {path!r} does not compute what the "
                f"module does (relative difference {error:.3g}); {_HOW}"
            )
    return explicit


def _with_replaced(root: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``root`` with the submodules at the given paths replaced; only the modules on
    the way to them are (shallowly) copied, everything else is shared."""
    if "" in replacements:
        return replacements[""]
    clone = copy.copy(root)
    clone._modules = dict(root._modules)
    below: dict[str, dict[str, nn.Module]] = {}
    for path, new in replacements.items():
        head, _, rest = path.partition(".")
        below.setdefault(head, {})[rest] = new
    for head, sub in below.items():
        clone._modules[head] = _with_replaced(root._modules[head], sub)
    return clone


_SDPA_PARAMETERS = (
    "query",
    "key",
    "value",
    "attn_mask",
    "dropout_p",
    "is_causal",
    "scale",
    "enable_gqa",
)
_SDPA_DEFAULTS = {"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None}


def explicit_sdpa(graph: fx.Graph) -> None:
    """Rewrite each ``F.scaled_dot_product_attention(q, k, v)`` node of ``graph`` into
    ``softmax((q * scale) @ k^T) @ v``; masks, causal masking, dropout and grouped-query
    attention are refused, naming the node and the module that calls it."""
    for node in list(graph.nodes):
        if node.target is not F.scaled_dot_product_attention:
            continue
        bound = {**_SDPA_DEFAULTS, **dict(zip(_SDPA_PARAMETERS, node.args)), **node.kwargs}
        unsupported = [
            name
            for name in ("attn_mask", "dropout_p", "is_causal", "enable_gqa")
            if bound.get(name) not in (None, False, 0.0)
        ]
        if unsupported:
            stack = node.meta.get("nn_module_stack") or {}
            scope = next(reversed(stack.values()))[0] if stack else "<top level>"
            raise UnsupportedLayerError(
                f"cannot write out scaled_dot_product_attention (node {node.name!r}) inside "
                f"{scope!r} with {', '.join(unsupported)}; {_HOW}"
            )
        with graph.inserting_before(node):
            out = _written_out(graph, node, bound)
        node.replace_all_uses_with(out)
        graph.erase_node(node)


def _written_out(graph: fx.Graph, node: fx.Node, bound: dict) -> fx.Node:
    """The nodes of ``softmax((q * scale) @ k^T) @ v``, named after the module of ``node`` (q
    scaled rather than the scores, as torch does: fewer values)."""
    meta = {"nn_module_stack": node.meta.get("nn_module_stack", {})}

    def add(kind: str, target, *args) -> fx.Node:
        new = graph.create_node(kind, target, args)
        new.meta = dict(meta)
        return new

    q, scale = bound["query"], bound["scale"]
    if scale is None:
        scale = add("call_function", operator.pow, add("call_method", "size", q, -1), -0.5)
    key_t = add("call_method", "transpose", bound["key"], -2, -1)
    scores = add("call_function", torch.matmul, add("call_function", operator.mul, q, scale), key_t)
    weights = add("call_method", "softmax", scores, -1)
    return add("call_function", torch.matmul, weights, bound["value"])
