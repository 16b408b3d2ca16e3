#!/usr/bin/env python3
"""Generate tests/fixtures/llama/*.json from the bundled examples/configs/<name>/config.json.

For every bundled config the model is built with the real Transformers
(``AutoModelForCausalLM.from_config`` under accelerate's ``init_empty_weights``, i.e. on the
meta device, then ``tie_weights()`` like ``from_pretrained``) and the structural facts the C++
side must reproduce are recorded: state_dict order and shapes, parameters, buffers, ties,
no-split classes, accelerate's module sizes; its bf16 module tree goes to
tests/fixtures/module_trees/<name>.json. Then device maps are computed for several budgets and
strategies with accelerate (get_balanced_memory / get_max_memory + infer_auto_device_map) and,
separately, with Transformers' own resolver (transformers.integrations.accelerate._get_device_map).
Nothing is downloaded; run with PYTHONHASHSEED=0 for deterministic key order.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings

import torch
from accelerate.utils import modeling as am

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dump_module_tree import build_meta_model_from_config, dtype_name, module_tree  # noqa: E402
from gen_accelerate_cases import pairs, run_captured  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, "examples", "configs")
OUT = os.path.join(ROOT, "tests", "fixtures", "llama")
TREES = os.path.join(ROOT, "tests", "fixtures", "module_trees")
NAMES = ["Llama-2-7b-hf", "Llama-2-70b-hf", "Llama-3.1-8B", "Llama-3.1-405B", "Mistral-7B-v0.1", "Qwen2.5-0.5B"]
STRATEGIES = ["sequential", "balanced", "balanced_low_0", "auto"]
TF_RESOLVER = "transformers.integrations.accelerate._get_device_map"


def config_path(name: str) -> str:
    return os.path.join(CONFIGS, name, "config.json")


def budget_sets(total_bf16: int) -> dict[str, dict]:
    """Named max_memory budgets: fixed ones from the brief plus two scaled to the model."""
    t = int(total_bf16)
    return {
        "gpu20_cpu100": {0: "20GB", "cpu": "100GB"},
        "2gpu20_cpu100": {0: "20GB", 1: "20GB", "cpu": "100GB"},
        "2gpu80": {0: "80GB", 1: "80GB"},
        "gpu10_cpu30": {0: "10GB", "cpu": "30GB"},
        "scaled_disk": {0: t // 3, 1: t // 3, "cpu": t // 6},
        "scaled_2gpu": {0: t // 2, 1: t},
    }


def quiet(fn):
    """Run ``fn`` with accelerate / transformers logs and warnings silenced."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for n in ("accelerate", "transformers"):
            logging.getLogger(n).setLevel(logging.ERROR)
        return fn()


def accelerate_budgets(model, strategy, max_memory, no_split, dtype):
    """What accelerate's load_checkpoint_and_dispatch computes for a strategy string."""
    mm = dict(max_memory)
    if strategy == "sequential":
        return am.get_max_memory(mm), "accelerate.utils.get_max_memory"
    return (
        am.get_balanced_memory(model, mm, no_split, dtype=dtype, low_zero=(strategy == "balanced_low_0")),
        "accelerate.utils.get_balanced_memory",
    )


def structure(name: str) -> tuple[dict, torch.nn.Module]:
    """Structural facts of one config; returns (fixture dict, bf16 meta model)."""
    path = config_path(name)
    models = {dt: quiet(lambda dt=dt: build_meta_model_from_config(path, dt)) for dt in ("float32", "bfloat16")}
    bf16 = models["bfloat16"]
    sd = bf16.state_dict(keep_vars=True)
    non_persistent = {
        f"{mn}.{bn}" if mn else bn for mn, m in bf16.named_modules() for bn in m._non_persistent_buffers_set
    }
    fixture = {
        "config": name,
        "model_type": bf16.config.model_type,
        "class": bf16.__class__.__name__,
        "no_split": sorted(bf16._no_split_modules or []),
        "state_dict": [[k, list(v.shape), dtype_name(v.dtype)] for k, v in sd.items()],
        "named_parameters": [[k, list(v.shape), dtype_name(v.dtype)] for k, v in bf16.named_parameters()],
        "buffers": [[k, list(v.shape), dtype_name(v.dtype), k not in non_persistent]
                    for k, v in bf16.named_buffers()],
        "tied": am.find_tied_parameters(bf16),
        "total_size": {dt: am.compute_module_sizes(m)[""] for dt, m in models.items()},
        "total_size_accelerate_dtype_arg": {
            "bfloat16": am.compute_module_sizes(models["float32"], dtype="bfloat16")[""],
            "float16": am.compute_module_sizes(models["float32"], dtype="float16")[""],
        },
    }
    total, (ms, names) = am.calculate_maximum_sizes(bf16)
    fixture["calculate_maximum_sizes_bf16"] = {"total": total, "max_layer": ms, "max_layer_names": names}
    return fixture, bf16


def device_maps(name: str, model, fixture: dict) -> list:
    """All device-map cases of one config."""
    from transformers.integrations import accelerate as tfa

    cases = []
    no_split = fixture["no_split"]
    for bname, mm in budget_sets(fixture["total_size"]["bfloat16"]).items():
        dtypes = ["bfloat16"] + (["float16"] if bname == "gpu20_cpu100" else [])
        for dtype in dtypes:
            for strategy in STRATEGIES:
                case = {"id": f"{name}_{bname}_{strategy}_{dtype}", "config": name, "strategy": strategy,
                        "max_memory": {str(k): v for k, v in mm.items()}, "max_memory_pairs": pairs(mm),
                        "dtype": dtype, "no_split": no_split,
                        "source": "accelerate.utils.infer_auto_device_map"}
                r = run_captured(lambda: accelerate_budgets(model, strategy, mm, no_split, dtype))
                if "raises" in r:
                    case["raises"] = r["raises"]
                    cases.append(case)
                    continue
                budgets, budget_fn = r["value"]
                case["budgets_source"] = budget_fn
                case["budgets"] = pairs(budgets)
                m = run_captured(lambda: am.infer_auto_device_map(model, max_memory=dict(budgets),
                                                                  no_split_module_classes=no_split, dtype=dtype))
                if "raises" in m:
                    case["raises"] = m["raises"]
                else:
                    case["map"] = pairs(m["value"])
                case["logs"] = m["logs"]
                case["warnings"] = [w["message"] for w in m["warnings"]]
                if dtype == "bfloat16":
                    t = run_captured(lambda: tfa._get_device_map(model, strategy, dict(mm), None))
                    tf = {"function": TF_RESOLVER, "args": "(model_bf16, strategy, max_memory, hf_quantizer=None)"}
                    if strategy == "sequential":
                        tb = run_captured(lambda: tfa.get_max_memory(dict(mm)))
                        tf["budgets_source"] = "transformers.integrations.accelerate.get_max_memory"
                    else:
                        tb = run_captured(lambda: tfa.get_balanced_memory(
                            model, dict(mm), set(no_split), None, low_zero=(strategy == "balanced_low_0")))
                        tf["budgets_source"] = "transformers.integrations.accelerate.get_balanced_memory"
                    tf["budgets"] = pairs(tb["value"]) if "value" in tb else None
                    if "raises" in t:
                        tf["raises"] = t["raises"]
                    else:
                        tf["map"] = pairs(t["value"])
                    tf["logs"] = t["logs"]
                    case["transformers"] = tf
                cases.append(case)
    return cases


def main() -> int:
    os.makedirs(OUT, exist_ok=True)
    os.makedirs(TREES, exist_ok=True)
    all_maps = []
    for name in NAMES:
        fixture, model = structure(name)
        with open(os.path.join(OUT, f"{name}.json"), "w", encoding="utf-8") as fh:
            json.dump(fixture, fh, separators=(",", ":"))
            fh.write("\n")
        with open(os.path.join(TREES, f"{name}.json"), "w", encoding="utf-8") as fh:
            json.dump(module_tree(model), fh, separators=(",", ":"))
            fh.write("\n")
        maps = device_maps(name, model, fixture)
        all_maps.extend(maps)
        print(f"{name}: {len(fixture['state_dict'])} state_dict entries, {len(maps)} device-map cases")
    with open(os.path.join(OUT, "device_maps.json"), "w", encoding="utf-8") as fh:
        fh.write("[\n" + ",\n".join(json.dumps(c, separators=(",", ":")) for c in all_maps) + "\n]\n")
    print(f"wrote tests/fixtures/llama/device_maps.json: {len(all_maps)} cases")
    return 0


if __name__ == "__main__":
    sys.exit(main())
