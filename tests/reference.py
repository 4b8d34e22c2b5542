"""Reference computations for the model-level tests: zennit 0.4.6 as an oracle, and the model
surgery the comparisons and conservation checks need.

Nothing here belongs to crp_toolkit; it only prepares models and runs zennit the way zennit's
documentation does (``composite.context(model)``, then one ``torch.autograd.grad`` call).
"""

from __future__ import annotations

import copy

import torch
import torchvision
import zennit.composites as zc
from torch import Tensor, nn
from zennit.canonizers import NamedMergeBatchNorm
from zennit.core import Composite as ZennitComposite
from zennit.layer import Sum as ZennitSum
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import crp_toolkit as ct

PRESETS = (
    "EpsilonPlus",
    "EpsilonPlusFlat",
    "EpsilonAlpha2Beta1",
    "EpsilonAlpha2Beta1Flat",
    "EpsilonGammaBox",
)

# Layers of the FashionMNIST fixture that read the model input (both get the first-layer rule).
FASHION_FIRST_LAYERS = ("conv1", "parallel.0")


def rel_err(a: Tensor, b: Tensor) -> float:
    """``max |a - b| / max |b|``: the relative error of ``a`` against the reference ``b``."""
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


# -- model surgery ---------------------------------------------------------------------------


def _batchnorms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def bn_eps_zero(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every BatchNorm's ``eps`` set to 0.

    Needed for exact comparisons with zennit: zennit's MergeBatchNorm folds the statistics
    into the preceding layer but leaves the BatchNorm module computing ``x / sqrt(1 + eps)``
    (it sets the running variance to 1, not to ``1 - eps``), and the relevance passes through
    that scale; crp_toolkit folds eps exactly. With eps = 0 both canonizations compute the same
    function, and the two engines agree to about 1e-16 in float64. The running variances of
    the models used here are far from 0, so eps = 0 is harmless.
    """
    model = copy.deepcopy(model)
    for bn in _batchnorms(model):
        bn.eps = 0.0
    return model


@torch.no_grad()
def calibrate_bn(model: nn.Module, shape: tuple[int, ...], batches: int = 3, seed: int = 0):
    """Set BatchNorm running statistics to the cumulative average over a few random batches.

    Random-weight torchvision models at init (running mean 0, var 1) shrink the signal layer
    by layer (EfficientNet's logits are about 1e-14), so the stabilizers would absorb all the
    relevance. With statistics of the actual activations the signal keeps its scale.
    Modifies ``model`` in place and returns it in eval mode.
    """
    batchnorms = _batchnorms(model)
    if not batchnorms:  # nothing to calibrate (ViTs): skip the forward passes
        return model.eval()
    generator = torch.Generator().manual_seed(seed)
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    for _ in range(batches):
        model(torch.randn(*shape, generator=generator, dtype=_dtype(model)))
    return model.eval()


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


@torch.no_grad()
def zero_biases(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every conv/linear bias set to zero (biases absorb relevance)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
            module.bias.zero_()
    return model


def torchvision_model(name: str, seed: int = 0, calibrate_shape: tuple[int, ...] | None = None):
    """A random-weight torchvision model (float64, eval mode); BatchNorm statistics calibrated
    on random inputs of ``calibrate_shape`` when given."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, name)(weights=None).double().eval()
    if calibrate_shape is not None:
        calibrate_bn(model, calibrate_shape, seed=seed)
    return model


# -- our side ----------------------------------------------------------------------------------


def ours_composite(preset: str, x: Tensor | None = None) -> ct.composites.Composite:
    """A crp_toolkit preset by name; EpsilonGammaBox gets the data range of ``x`` as bounds."""
    cls = getattr(ct.composites, preset)
    if preset == "EpsilonGammaBox":
        return cls(float(x.min()), float(x.max()))
    return cls()


# -- zennit's side -----------------------------------------------------------------------------


def zennit_composite(preset: str, x: Tensor, canonizers=None, first_layers=None):
    """zennit's preset of the same name. ZBox bounds are input-shaped tensors at the data
    range of ``x``. With ``first_layers`` (module names), the preset's first-layer rule goes to
    exactly those modules (zennit itself only gives it to the first module in definition
    order) and every other module gets the preset's ordinary rule."""
    cls = getattr(zc, preset)
    if preset == "EpsilonGammaBox":
        low = torch.full_like(x, float(x.min()))
        high = torch.full_like(x, float(x.max()))
        composite = cls(low=low, high=high, canonizers=canonizers)
    else:
        composite = cls(canonizers=canonizers)
    if first_layers is None:
        return composite

    first_map = getattr(composite, "first_map", [])
    layer_map = composite.layer_map

    def module_map(ctx, name, module):
        maps = first_map + layer_map if name in first_layers else layer_map
        return next((hook for types, hook in maps if isinstance(module, types)), None)

    return ZennitComposite(module_map=module_map, canonizers=canonizers)


def zennit_relevance(
    model: nn.Module, composite: ZennitComposite, x: Tensor, target: Tensor, logit: bool = False
) -> Tensor:
    """zennit's input relevance for ``target`` (one id per sample): output relevance one-hot
    at the target with value 1, or the logit when ``logit``."""
    x = x.clone().requires_grad_()
    with composite.context(model) as modified:
        out = modified(x)
        grad_out = torch.zeros_like(out)
        value = out.gather(1, target[:, None]).detach() if logit else 1.0
        grad_out.scatter_(1, target[:, None], value)
        (relevance,) = torch.autograd.grad(out, x, grad_out)
    return relevance.detach()


def zennit_canonizers(name: str) -> list:
    """zennit's canonizers for a torchvision model by its constructor name."""
    if name.startswith("vgg"):
        return [VGGCanonizer()]
    if name.startswith("resnet"):
        return [ResNetCanonizer()]
    raise KeyError(name)


class ZennitFashion(nn.Module):
    """The FashionMNIST fixture rewritten for zennit: the same modules (held as ``m``), each
    ReLU call with its own module, and the residual add through ``zennit.layer.Sum`` (zennit's
    plain gradient through ``+`` would give both branches all the relevance; with Sum it is
    split proportionally, as in crp_toolkit). Module names gain the prefix ``m.``."""

    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.m = m
        self.r1, self.r2, self.r3 = nn.ReLU(), nn.ReLU(), nn.ReLU()
        self.sum = ZennitSum()

    def forward(self, x: Tensor) -> Tensor:
        m = self.m
        main = m.bn2(m.conv2(self.r1(m.bn1(m.conv1(x)))))
        h = m.pool(self.r2(self.sum(torch.stack([main, m.parallel(x)], dim=-1))))
        return m.linear2(self.r3(m.linear1(torch.flatten(h, 1))))


def zennit_fashion(model: nn.Module, preset: str, x: Tensor) -> tuple[nn.Module, ZennitComposite]:
    """The (uncanonized) fixture model wrapped for zennit, and the preset with zennit's own
    BatchNorm merging and the first-layer rule on both input readers."""
    wrapped = ZennitFashion(model)
    canonizer = NamedMergeBatchNorm(
        [(["m.conv1"], "m.bn1"), (["m.conv2"], "m.bn2"), (["m.parallel.0"], "m.parallel.1")]
    )
    first = tuple(f"m.{name}" for name in FASHION_FIRST_LAYERS)
    return wrapped, zennit_composite(preset, x, [canonizer], first_layers=first)


def state_snapshot(model: nn.Module) -> dict[str, object]:
    """Everything of ``model`` that explaining must leave alone: parameters and buffers
    (cloned), requires_grad flags, hooks, training flags, in-place flags, module types."""
    hooks = {}
    for name, m in model.named_modules():
        hooks[name] = tuple(
            len(getattr(m, attr))
            for attr in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_backward_hooks",
                "_backward_pre_hooks",
                "_state_dict_hooks",
                "_load_state_dict_pre_hooks",
            )
        )
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "keys": list(model.state_dict().keys()),
        "requires_grad": {k: p.requires_grad for k, p in model.named_parameters()},
        "param_ids": {k: id(p) for k, p in model.named_parameters()},
        "hooks": hooks,
        "training": {k: m.training for k, m in model.named_modules()},
        "inplace": {k: m.inplace for k, m in model.named_modules() if hasattr(m, "inplace")},
        "types": {k: type(m) for k, m in model.named_modules()},
        "bn_eps": {k: m.eps for k, m in model.named_modules() if hasattr(m, "running_var")},
    }


def assert_unchanged(model: nn.Module, before: dict[str, object]) -> None:
    """Compare ``model`` with a :func:`state_snapshot` taken earlier, bit for bit."""
    after = state_snapshot(model)
    for key in before:
        if key == "state":
            continue
        assert after[key] == before[key], f"{key} of the caller's model changed"
    for name, value in before["state"].items():
        assert torch.equal(after["state"][name], value), f"{name} of the caller's model changed"


class ZennitCrpCase(nn.Module):
    """zennit-crp's analytic test model: two bias-free dense layers reading x, concatenated,
    then a third; x = [-1, 1] gives the output 10."""

    def __init__(self) -> None:
        super().__init__()
        self.layer1 = nn.Linear(2, 2, bias=False)
        self.layer2 = nn.Linear(2, 2, bias=False)
        self.layer3 = nn.Linear(4, 1, bias=False)
        with torch.no_grad():
            self.layer1.weight.copy_(torch.tensor([[1.0, 2.0], [0.0, 1.0]]))
            self.layer2.weight.copy_(torch.tensor([[2.0, 3.0], [0.0, 0.0]]))
            self.layer3.weight.copy_(torch.tensor([[1.0, 4.0, 5.0, 0.0]]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer3(torch.cat([self.layer1(x), self.layer2(x)], dim=1))


def small_vit() -> nn.Module:
    """A two-block ViT on 16x16 inputs (4x4 patches of 4 pixels, 17 tokens with the class
    token), float64, random weights with a non-zero head."""
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(
        image_size=16,
        patch_size=4,
        num_layers=2,
        num_heads=2,
        hidden_dim=8,
        mlp_dim=16,
        num_classes=3,
    )
    nn.init.normal_(model.heads.head.weight, std=0.5)
    return model.double().eval()
