#!/usr/bin/env python3
"""Generate tests/fixtures/llama/quantized_plans.json: how the real Transformers sizes and places
bitsandbytes-quantized Llama models (nf4 with and without double quantization, int8).

For each bundled config the bf16 model is built on the meta device (as tools/gen_llama_fixtures.py
does), the real HfQuantizer for a BitsAndBytesConfig is created (transformers.quantizers.
AutoHfQuantizer) and its preprocess_model() replaces the Linear modules by bnb Linear4bit /
Linear8bitLt on meta (replace_with_bnb_linear). Then, with the quantizer:
  * transformers.integrations.accelerate.compute_module_sizes(model, hf_quantizer): total, one
    decoder layer, the sizes of a layer's parameters (these are what Transformers plans with);
  * transformers.integrations.accelerate._get_device_map(model, strategy, max_memory, hf_quantizer)
    for explicit budgets (budgets after the quantizer's adjust_max_memory are recorded too);
  * which modules were replaced (the quantized parameter names).
No GPU is needed for these calls (they only read shapes). Run with PYTHONHASHSEED=0.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dump_module_tree import build_meta_model_from_config  # noqa: E402
from gen_accelerate_cases import pairs, run_captured  # noqa: E402
from gen_llama_fixtures import config_path, quiet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "llama", "quantized_plans.json")
NAMES = ["Llama-2-70b-hf", "Llama-3.1-8B"]
QUANT = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16"),
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype="bfloat16"),
    "int8": dict(load_in_8bit=True),
}
STRATEGIES = ["sequential", "auto"]


def budgets_for(name: str) -> dict[str, dict]:
    if name == "Llama-2-70b-hf":
        return {"gpu20_cpu100": {0: "20GB", "cpu": "100GB"},
                "2gpu20_cpu100": {0: "20GB", 1: "20GB", "cpu": "100GB"},
                "2gpu24": {0: "24GB", 1: "24GB"},
                "gpu10_cpu30": {0: "10GB", "cpu": "30GB"}}
    return {"gpu4_cpu30": {0: "4GB", "cpu": "30GB"},
            "2gpu3_cpu30": {0: "3GB", 1: "3GB", "cpu": "30GB"},
            "gpu8": {0: "8GB"}}


def quantized_model(name: str, qname: str):
    from transformers import BitsAndBytesConfig
    from transformers.quantizers import AutoHfQuantizer

    model = quiet(lambda: build_meta_model_from_config(config_path(name), "bfloat16"))
    qc = BitsAndBytesConfig(**QUANT[qname])
    hfq = AutoHfQuantizer.from_config(qc, pre_quantized=False)
    quiet(lambda: hfq.preprocess_model(model, device_map="auto", dtype=torch.bfloat16))
    return model, hfq


def case(name: str, qname: str) -> dict:
    from transformers.integrations import accelerate as tfa

    model, hfq = quantized_model(name, qname)
    sizes, leaves = tfa.compute_module_sizes(model, hfq, only_modules=False)
    layer = "model.layers.0"
    quantized = [n for n, _ in model.named_parameters() if hfq.param_needs_quantization(model, n)]
    out = {
        "config": name, "quantization": qname, "bitsandbytes_config": QUANT[qname], "dtype": "bfloat16",
        "quantizer": type(hfq).__name__,
        "quantized_element_size": hfq.quantized_element_size,
        "quantized_parameters": quantized,
        "module_classes": sorted({type(m).__module__ + "." + type(m).__name__ for n, m in model.named_modules()
                                  if n.startswith(layer + ".")}),
        "sizes": {"total": sizes[""], "layer0": sizes[layer],
                  "layer0_tensors": {k: v for k, v in sizes.items() if k.startswith(layer + ".")
                                     and k.rsplit(".", 1)[-1] in ("weight", "bias")},
                  "embed_tokens": sizes["model.embed_tokens"], "lm_head": sizes.get("lm_head", 0),
                  "norm": sizes["model.norm"]},
        "source": "transformers.integrations.accelerate.compute_module_sizes(model, hf_quantizer)",
        "maps": [],
    }
    for bname, mm in budgets_for(name).items():
        for strategy in STRATEGIES:
            c = {"budget": bname, "max_memory_pairs": pairs(mm), "strategy": strategy,
                 "function": "transformers.integrations.accelerate._get_device_map(model, strategy, max_memory, hf_quantizer)"}
            if strategy == "sequential":
                b = run_captured(lambda: tfa.get_max_memory(dict(mm)))
            else:
                b = run_captured(lambda: tfa.get_balanced_memory(model, dict(mm), set(model._no_split_modules),
                                                                 hfq, low_zero=False))
            if "value" in b:
                c["budgets"] = pairs(b["value"])
                c["adjusted_budgets"] = pairs(hfq.adjust_max_memory(dict(b["value"])))
            # _get_device_map = these budgets -> adjust_max_memory -> infer_auto_device_map(...,
            # hf_quantizer) -> validate_environment (which refuses cpu/disk entries unless
            # llm_int8_enable_fp32_cpu_offload): the map is recorded from infer_auto_device_map,
            # and whether _get_device_map accepted it.
            if "adjusted_budgets" in c:
                m = run_captured(lambda: tfa.infer_auto_device_map(
                    model, max_memory=hfq.adjust_max_memory(dict(b["value"])),
                    no_split_module_classes=model._no_split_modules, hf_quantizer=hfq))
                if "raises" in m:
                    c["raises"] = m["raises"]
                else:
                    c["map"] = pairs(m["value"])
            g = run_captured(lambda: tfa._get_device_map(model, strategy, dict(mm), hfq))
            c["get_device_map"] = {"raises": g["raises"]} if "raises" in g else {"map": pairs(g["value"])}
            out["maps"].append(c)
    return out


def main() -> int:
    import bitsandbytes
    import transformers

    cases = [case(n, q) for n in NAMES for q in QUANT]
    doc = {"generator": "tools/gen_quantized_plan_fixtures.py",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "bitsandbytes": bitsandbytes.__version__},
           "cases": cases}
    with open(OUT, "w", encoding="utf-8") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")
    for c in cases:
        print(c["config"], c["quantization"], c["sizes"]["total"], c["sizes"]["layer0"],
              [(m["budget"], m["strategy"], len(m.get("map", [])), "raises" in m["get_device_map"]) for m in c["maps"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
