#!/usr/bin/env python3
"""Reference logits for quantized execution, from the REAL transformers + bitsandbytes.

For each tiny model and each bitsandbytes config below, Transformers quantizes the model as
from_pretrained(src, quantization_config=BitsAndBytesConfig(...), dtype=float32,
device_map="cpu") does, and bitsandbytes dequantizes every quantized Linear weight back to
float32 (4-bit: the reference backend's dequantize_4bit, flat blocks over the whole tensor as
the CUDA kernel does -- the native CPU kernel restarts blocks per row when in_features is not
a multiple of the block size; LLM.int8: int8_vectorwise_dequant). Those dequantized weights are
put into the plain float32 model (LlamaForCausalLM from the same folder) and one forward pass
over the fixture prompt gives the logits of every position. stowage's quantize-on-load +
quantized execution (tests/conformance/offload_placement.cpp) must give the same logits within
float32 summation noise: the weights are the same numbers, only the order of the sums differs
(double quantization: where the nested offsets recorded here equal stowage's; see below).

Output: tests/fixtures/tiny/quantized_forward.json
Run: /opt/stowage-tools-venv/bin/python tools/gen_quantized_forward_fixtures.py
"""
import base64
import json
import logging
import os
import struct

logging.disable(logging.WARNING)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
import torch  # noqa: E402
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
TINY = os.path.join(ROOT, "tests", "fixtures", "tiny")
OUT = os.path.join(TINY, "quantized_forward.json")
# bitsandbytes' reference (pure-torch) backend.
DEFAULT_KS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

# name -> BitsAndBytesConfig kwargs (compute dtype float32 throughout: the C++ side runs
# llama_for_causal_lm<nf4<fp32, DoubleQuant>> / <int8<fp32>>).
CONFIGS = {
    "nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=torch.float32),
    "nf4_dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32),
    "int8": dict(load_in_8bit=True),
}
MODELS = ["llama_gqa", "llama3_tied"]


def b64f32(t):
    a = t.detach().to(torch.float32).contiguous().reshape(-1).tolist()
    return base64.b64encode(struct.pack("<%df" % len(a), *a)).decode("ascii")


def dequantized_weights(src, kwargs):
    """module name -> float32 weight, as bitsandbytes dequantizes what it quantized; and
    module name -> the nested offset (mean of the block scales) of double quantization."""
    model = AutoModelForCausalLM.from_pretrained(
        src, quantization_config=BitsAndBytesConfig(**kwargs), dtype=torch.float32,
        device_map="cpu")
    out, offsets = {}, {}
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            qs = mod.weight.quant_state
            if qs.nested:
                offsets[name] = qs.offset.item()
                absmax = F.dequantize_blockwise(qs.absmax, qs.state2)
                absmax += qs.offset
            else:
                absmax = qs.absmax
            out[name] = torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
                DEFAULT_KS, mod.weight.data, absmax.float(), qs.blocksize, qs.quant_type,
                qs.shape, torch.float32)
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            out[name] = F.int8_vectorwise_dequant(mod.weight.data, mod.weight.SCB).float()
    return out, offsets


def main():
    fx = {"generator": "tools/gen_quantized_forward_fixtures.py",
          "transformers": transformers.__version__, "torch": torch.__version__,
          "bitsandbytes": bnb.__version__, "cases": []}
    for model_name in MODELS:
        with open(os.path.join(TINY, model_name + ".json")) as f:
            prompt = json.load(f)["prompt"]
        src = os.path.join(TINY, "models", model_name)
        for cfg_name, kwargs in CONFIGS.items():
            deq, offsets = dequantized_weights(src, kwargs)
            ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
            ref.eval()
            mods = dict(ref.named_modules())
            with torch.no_grad():
                for name, w in deq.items():
                    assert mods[name].weight.shape == w.shape, name
                    mods[name].weight.copy_(w)
                logits = ref(torch.tensor([prompt])).logits[0]
            fx["cases"].append({
                "model": model_name, "model_dir": "models/" + model_name, "config": cfg_name,
                "prompt": prompt, "quantized_modules": sorted(deq.keys()),
                # torch's float32 mean is not reproducible bit for bit (precision/nf4.hpp
                # absmax_mean): where stowage's offset differs in the last bit, a few 8-bit
                # scale codes move by one step and the weights are not the same numbers.
                "nested_offsets": offsets,
                "logits_all": {"shape": list(logits.shape), "f32le_b64": b64f32(logits)},
            })
            print(model_name, cfg_name, len(deq), "quantized linears")
    with open(OUT, "w") as f:
        json.dump(fx, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
