"""Torch definitions of the fixture models of accelerate-cases.md §A (F1..F17) and the extra
models used by its cases B-L (D9..D13, seq(n), blocks, H10, ...).

Every builder is deterministic (weights are irrelevant: only structure, dtypes and ties
matter). ``MODELS`` maps a fixture ID (the file name under tests/fixtures/module_trees/) to a
zero-argument builder; ``NATURAL_NO_SPLIT`` gives the no-split class list that makes sense
for each model (used by the generated cases).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from torch import nn


class ModelForTest(nn.Module):
    """accelerate's ``ModelForTest``: Linear(3,4), BatchNorm1d(4), Linear(4,5)."""

    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(3, 4)
        self.batchnorm = nn.BatchNorm1d(4)
        self.linear2 = nn.Linear(4, 5)


class SubModule(nn.Module):
    """Holds a reference to a parameter owned by its parent (accelerate test)."""

    def __init__(self, ref_to_parameter):
        super().__init__()
        self.parameter = ref_to_parameter


class LinearModuleAndSubModule(nn.Linear):
    """A Linear whose child re-registers the parent's weight (prefix-tie test)."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.weight_submodule = SubModule(self.weight)


class Model(nn.Module):
    """Root of F5 ``PrefixTie``."""

    def __init__(self):
        super().__init__()
        self.compute = LinearModuleAndSubModule(3, 8)


class CustomModule(nn.Module):
    """Two Linear(20, 20) (F10 FBPartial)."""

    def __init__(self):
        super().__init__()
        self.submodule1 = nn.Linear(20, 20)
        self.submodule2 = nn.Linear(20, 20)


class RootParam(nn.Module):
    """F15: root with a direct parameter, a child and a direct buffer."""

    def __init__(self):
        super().__init__()
        self.big = nn.Parameter(torch.zeros(1000))
        self.lin = nn.Linear(10, 10)
        self.register_buffer("buf", torch.zeros(5))


class Issue1548(nn.Module):
    """F16: two big direct parameters and one Linear(1000, 1000) child."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(1000, 1000))
        self.b = nn.Parameter(torch.zeros(1000, 1000))
        self.layer = nn.Linear(1000, 1000)


class BoolBuffer(nn.Module):
    """D9/D10: a root whose only tensor is a bool buffer ``mask``."""

    def __init__(self, n):
        super().__init__()
        self.register_buffer("mask", torch.zeros(n, dtype=torch.bool))


class Attention(nn.Module):
    """ToyGPT attention: c_attn, c_proj and a bool causal-mask buffer."""

    def __init__(self):
        super().__init__()
        self.c_attn = nn.Linear(8, 24)
        self.c_proj = nn.Linear(8, 8)
        self.register_buffer("mask", torch.ones(16, 16, dtype=torch.bool))


class MLP(nn.Module):
    """ToyGPT MLP: fc, GELU, out."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 32)
        self.act = nn.GELU()
        self.out = nn.Linear(32, 8)


class Block(nn.Module):
    """ToyGPT block (3520 bytes in fp32)."""

    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(8)
        self.attn = Attention()
        self.ln2 = nn.LayerNorm(8)
        self.mlp = MLP()


class ToyGPT(nn.Module):
    """F17: a tiny GPT with tied lm_head (unless ``tied=False``)."""

    def __init__(self, tied=True):
        super().__init__()
        self.wte = nn.Embedding(50, 8)
        self.wpe = nn.Embedding(16, 8)
        self.h = nn.ModuleList([Block() for _ in range(4)])
        self.ln_f = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 50, bias=False)
        if tied:
            self.lm_head.weight = self.wte.weight


def seq(n: int, size: int = 1000) -> nn.Sequential:
    """``seq(n)`` of accelerate-cases §F: Sequential(linear1..linearN = Linear(size, size))."""
    return nn.Sequential(OrderedDict((f"linear{i}", nn.Linear(size, size)) for i in range(1, n + 1)))


def f1() -> nn.Module:
    return ModelForTest()


def f1_half() -> nn.Module:
    return ModelForTest().half()


def f2() -> nn.Module:
    return nn.Sequential(ModelForTest(), ModelForTest(), ModelForTest())


def seq2_f1() -> nn.Module:
    return nn.Sequential(ModelForTest(), ModelForTest())


def _tied_layers(variant: str) -> nn.Module:
    m = nn.Sequential(
        OrderedDict([("layer1", ModelForTest()), ("layer2", ModelForTest()), ("layer3", ModelForTest())])
    )
    m.layer3.linear2.weight = m.layer1.linear2.weight
    if variant in ("B", "C"):
        m.layer2.linear2.weight = m.layer1.linear2.weight
    if variant == "C":
        m.layer2.linear1.weight = m.layer1.linear1.weight
    return m


def f4() -> nn.Module:
    m = nn.Sequential(
        OrderedDict(
            [
                ("linear1", nn.Linear(4, 4)),
                ("linear2", nn.Linear(6, 6)),
                ("linear3", nn.Linear(4, 4)),
                ("linear4", nn.Linear(6, 6)),
            ]
        )
    )
    m.linear3.weight = m.linear1.weight
    m.linear3.bias = m.linear1.bias
    return m


def f6() -> nn.Module:
    m = ModelForTest()
    m.linear1.register_buffer("test_buffer1", torch.zeros(10, 2))
    m.batchnorm.register_buffer("test_buffer2", torch.zeros(10, 3))
    m.linear2.register_buffer("test_buffer3", torch.zeros(10, 3))
    return m


def f7() -> nn.Module:
    m = f6()
    m.linear3 = nn.Linear(4, 5)
    m.linear3.register_buffer("test_buffer4", torch.zeros(10, 2))
    return m


def _fb(sizes) -> nn.Module:
    inner = nn.Sequential(OrderedDict((f"linear{i + 1}", nn.Linear(a, b)) for i, (a, b) in enumerate(sizes)))
    return nn.Sequential(OrderedDict([("module", inner)]))


def f10() -> nn.Module:
    return nn.Sequential(
        OrderedDict([("module1", CustomModule()), ("module2", CustomModule()), ("module3", CustomModule())])
    )


def f11() -> nn.Module:
    m = nn.Sequential(OrderedDict([("linear1", nn.Linear(10, 10)), ("linear2", nn.Linear(10, 10))]))
    m.linear2.weight = m.linear1.weight
    return m


def f12() -> nn.Module:
    m = nn.Sequential(
        OrderedDict(
            [("linear1", nn.Linear(10, 10)), ("batchnorm", nn.BatchNorm1d(10)), ("linear2", nn.Linear(10, 10))]
        )
    )
    for child in m.children():
        child.register_buffer("buffer", torch.zeros(5))
    return m


def f13() -> nn.Module:
    m = nn.ModuleList([nn.Linear(10, 10) for _ in range(15)])
    for i in range(1, 15):
        m[i].weight = m[i - 1].weight
    return m


def f14() -> nn.Module:
    layer = nn.Linear(10, 10)
    return nn.Sequential(layer, layer)


def d11() -> nn.Module:
    m = ModelForTest()
    m.linear1.weight = m.linear2.weight
    return m


def d12() -> nn.Module:
    m = ModelForTest()
    m.linear1.register_buffer("test_buffer", torch.zeros(10, 10))
    m.register_buffer("test_buffer2", torch.zeros(20, 10))
    return m


def h10() -> nn.Module:
    m = ModelForTest()
    m.linear1.register_buffer("np", torch.zeros(3), persistent=False)
    return m


def seq_tied(n: int, ties) -> Callable[[], nn.Module]:
    """seq(n) with ``ties`` = [(dst, src)] meaning ``linear{dst}.weight = linear{src}.weight``."""

    def build() -> nn.Module:
        m = seq(n)
        for dst, src in ties:
            getattr(m, f"linear{dst}").weight = getattr(m, f"linear{src}").weight
        return m

    return build


def blocks_tied() -> nn.Module:
    m = nn.Sequential(OrderedDict([("block1", seq(4)), ("block2", seq(4))]))
    m.block1.linear1.weight = m.block2.linear1.weight
    return m


MODELS: dict[str, Callable[[], nn.Module]] = {
    "F1": f1,
    "F1_half": f1_half,
    "F2": f2,
    "Seq2F1": seq2_f1,
    "F3A": lambda: _tied_layers("A"),
    "F3B": lambda: _tied_layers("B"),
    "F3C": lambda: _tied_layers("C"),
    "F4": f4,
    "F5": Model,
    "F6": f6,
    "F7": f7,
    "F8": lambda: _fb([(10, 4), (4, 4), (4, 8)]),
    "F9": lambda: _fb([(10, 10), (10, 10), (10, 10)]),
    "F10": f10,
    "F11": f11,
    "F12": f12,
    "F13": f13,
    "F14": f14,
    "F15": RootParam,
    "F16": Issue1548,
    "F17": ToyGPT,
    "F17_untied": lambda: ToyGPT(tied=False),
    "D9": lambda: BoolBuffer(10),
    "D10": lambda: BoolBuffer(3),
    "D11": d11,
    "D12": d12,
    "D13": lambda: d12().half(),
    "H10": h10,
    "Seq4": lambda: seq(4),
    "Seq4_t12": seq_tied(4, [(2, 1)]),
    "Seq4_t124": seq_tied(4, [(2, 1), (4, 1)]),
    "Seq5_t": seq_tied(5, [(1, 4), (2, 3), (5, 2)]),
    "Blocks_t": blocks_tied,
}

# The no-split class list that suits each model (generated cases run with and without it).
NATURAL_NO_SPLIT: dict[str, list[str]] = {
    "F1": ["ModelForTest"],
    "F1_half": ["ModelForTest"],
    "F2": ["ModelForTest"],
    "Seq2F1": ["ModelForTest"],
    "F3A": ["ModelForTest"],
    "F3B": ["ModelForTest"],
    "F3C": ["ModelForTest"],
    "F5": ["LinearModuleAndSubModule"],
    "F6": ["ModelForTest"],
    "F7": ["ModelForTest"],
    "F10": ["CustomModule"],
    "F15": ["Linear"],
    "F16": ["Linear"],
    "F17": ["Block"],
    "F17_untied": ["Block"],
    "D11": ["ModelForTest"],
    "D12": ["ModelForTest"],
    "D13": ["ModelForTest"],
    "H10": ["ModelForTest"],
    "Blocks_t": ["Sequential"],
}


def no_split_for(model_id: str) -> list[str]:
    """Natural no-split list of a model (``["Linear"]`` when nothing better applies)."""
    return NATURAL_NO_SPLIT.get(model_id, ["Linear"])
