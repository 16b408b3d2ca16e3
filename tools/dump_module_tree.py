#!/usr/bin/env python3
"""Dump the structure of a torch ``nn.Module`` as stowage's ``module_tree`` JSON.

This is a fixture tool: it describes a model built with the real torch (or a
Transformers model built on the meta device from a ``config.json``) so that the
C++ tests can rebuild exactly the same tree without Python.

Schema (arrays keep torch's registration order)::

    {"class": "ModelForTest",
     "parameters": [{"name": "weight", "shape": [4, 3], "dtype": "float32"}],
     "buffers":    [{"name": "running_mean", "shape": [4], "dtype": "float32",
                     "persistent": true}],
     "children":   [{"name": "linear1", "class": "Linear", "parameters": [],
                     "buffers": [], "children": []}],
     "tied_parameters": [["linear1.weight", "linear3.weight"]]}

Rules:

* ``parameters`` / ``buffers`` list a module's *direct* tensors (torch's
  ``_parameters`` / ``_buffers``, i.e. ``named_parameters(recurse=False,
  remove_duplicate=False)``); entries that are ``None`` are skipped.
* A tensor alias (tied weight) appears in the tree under EVERY name where it is
  registered, and all of its full dotted names form one group of
  ``tied_parameters``.
* A module object registered twice (``Sequential(layer, layer)``) is emitted
  under each name (no de-duplication of children), and therefore all of its
  parameters are tied (``[["0.bias", "1.bias"], ["0.weight", "1.weight"]]``).
* ``tied_parameters`` exists only at the root; it considers parameters only
  (like accelerate's ``find_tied_parameters``); each group is string-sorted and
  groups are ordered by the first registration of their first-seen member.
* dtype names are torch's without the ``torch.`` prefix (``float32``,
  ``bfloat16``, ``int64``, ``bool``).

CLI::

    dump_module_tree.py --config path/config.json [--dtype bfloat16] [-o out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch
from torch import nn


def dtype_name(dtype: torch.dtype) -> str:
    """Return torch's dtype name without the ``torch.`` prefix."""
    return str(dtype).replace("torch.", "")


def _tensor_entry(name: str, tensor: torch.Tensor) -> dict[str, Any]:
    return {"name": name, "shape": list(tensor.shape), "dtype": dtype_name(tensor.dtype)}


def _walk(module: nn.Module, prefix: str, seen: dict[int, list[str]]) -> dict[str, Any]:
    """Build the node of ``module``; record every parameter name by tensor identity in ``seen``."""
    params = []
    for name, param in module._parameters.items():
        if param is None:
            continue
        params.append(_tensor_entry(name, param))
        seen.setdefault(id(param), []).append(prefix + name)
    buffers = []
    non_persistent = getattr(module, "_non_persistent_buffers_set", set())
    for name, buf in module._buffers.items():
        if buf is None:
            continue
        entry = _tensor_entry(name, buf)
        entry["persistent"] = name not in non_persistent
        buffers.append(entry)
    children = []
    for name, child in module._modules.items():
        if child is None:
            continue
        node = _walk(child, f"{prefix}{name}.", seen)
        children.append({"name": name, **node})
    return {
        "class": module.__class__.__name__,
        "parameters": params,
        "buffers": buffers,
        "children": children,
    }


def module_tree(model: nn.Module) -> dict[str, Any]:
    """Return the module_tree JSON object (a dict) describing ``model``."""
    seen: dict[int, list[str]] = {}
    root = _walk(model, "", seen)
    groups = [sorted(set(names)) for names in seen.values() if len(names) > 1]
    root["tied_parameters"] = groups
    return root


def build_meta_model_from_config(config_path: str, dtype: str | None = None) -> nn.Module:
    """Build ``AutoModelForCausalLM.from_config`` on the meta device (no weights, no hub access).

    Parameters are created on meta (accelerate ``init_empty_weights``); buffers stay on CPU as
    they do in ``from_pretrained``. Tied weights are tied with ``model.tie_weights()``.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(config_path)
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    # Transformers 5.x leaves tie_word_embeddings untied after from_config under
    # init_empty_weights; from_pretrained ties them, so do the same here.
    model.tie_weights()
    return model


def dumps(tree: dict[str, Any]) -> str:
    """Serialise a tree compactly but deterministically (one line per node is not needed)."""
    return json.dumps(tree, separators=(",", ":")) + "\n"


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="path to a Transformers config.json")
    parser.add_argument("--dtype", default=None, help="torch dtype name, e.g. bfloat16")
    parser.add_argument("-o", "--output", default="-", help="output file (default stdout)")
    args = parser.parse_args(argv)
    tree = module_tree(build_meta_model_from_config(args.config, args.dtype))
    text = dumps(tree)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        with open(args.output, "w", encoding="utf-8") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
