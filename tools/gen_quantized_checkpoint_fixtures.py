#!/usr/bin/env python3
"""Generate tests/fixtures/quantized/ with the REAL transformers + bitsandbytes (CPU backend).

What Transformers writes when it quantizes a model with bitsandbytes and saves it: for each
variant below, the tiny Llama checkpoint (tests/fixtures/tiny/models/...) is loaded with
AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(...),
device_map="cpu") and written back with save_pretrained. This "real path" works on a CPU-only
machine with bitsandbytes 0.50.2 (its CPU backend quantizes with the pure-torch default ops and
the native CPU kernels), so no tensor below is built by hand.

Per variant, expected.json records: the options, every tensor of the saved model.safetensors
(key, safetensors dtype, shape, sha256 of the raw bytes, base64 of the bytes for the small
ones), the file's own sha256, and config.json as Transformers wrote it (quantization_config
included). The C++ test (tests/conformance/quantized_interchange.cpp) runs stowage-convert
with the same options and compares.

Reverse direction: for the variants marked `keep`, the saved model.safetensors itself is kept
(tests/fixtures/quantized/<name>/model.safetensors) and the saved folder is loaded again with
from_pretrained (Transformers' own deserialisation: Params4bit.from_prequantized /
Int8Params with SCB); for every quantized Linear we record what bitsandbytes dequantizes the
weight to (dequantize_4bit with its QuantState, in the state's dtype and in float32, both
from bitsandbytes' reference backend (the pure-torch default ops, which follow the CUDA
kernel) and from F.dequantize_4bit as it runs here (the native CPU kernel: it computes block
indices per row, so for a weight whose in_features is not a multiple of the block size, e.g.
down_proj with 160 = 2.5 blocks of 64, it disagrees with CUDA and the reference backend);
int8_vectorwise_dequant for LLM.int8, float32), as sha256 plus full bytes for the first layer.

Block size 128: BitsAndBytesConfig has no block-size field (Linear4bit always uses 64), so
that variant patches Linear4bit.__init__ to give its Params4bit blocksize=128 before the same
from_pretrained path runs; everything else is unchanged Transformers/bitsandbytes code.

Run: /opt/stowage-tools-venv/bin/python tools/gen_quantized_checkpoint_fixtures.py
"""
import base64
import copy
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import tempfile

logging.disable(logging.WARNING)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODELS = os.path.join(ROOT, "tests", "fixtures", "tiny", "models")
OUT = os.path.join(ROOT, "tests", "fixtures", "quantized")
SMALL = 4096  # tensors up to this many bytes are stored in full
DEFAULT_KS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# name, source model, BitsAndBytesConfig kwargs, from_pretrained dtype (None: Transformers'
# default), 4-bit block size, keep the written checkpoint for the reverse test.
VARIANTS = [
    dict(name="nf4_dq_bf16", model="llama_gqa",
         bnb=dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                  bnb_4bit_compute_dtype="bfloat16"),
         dtype="bfloat16", blocksize=64, keep=True),
    dict(name="nf4_f32", model="llama_gqa",
         bnb=dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
         dtype=None, blocksize=64, keep=False),
    dict(name="fp4_bf16_fp16compute", model="llama_gqa",
         bnb=dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="float16"),
         dtype="bfloat16", blocksize=64, keep=True),
    dict(name="nf4_dq_bs128_bf16", model="llama_gqa",
         bnb=dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                  bnb_4bit_compute_dtype="bfloat16"),
         dtype="bfloat16", blocksize=128, keep=False),
    dict(name="int8_bf16", model="llama_gqa", bnb=dict(load_in_8bit=True),
         dtype="bfloat16", blocksize=None, keep=True),
    dict(name="int8_f32", model="llama_gqa", bnb=dict(load_in_8bit=True),
         dtype=None, blocksize=None, keep=False),
    dict(name="nf4_dq_tied_bf16", model="llama3_tied",
         bnb=dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                  bnb_4bit_compute_dtype="bfloat16"),
         dtype="bfloat16", blocksize=64, keep=False),
]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def raw(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy().tobytes()


def read_safetensors(path):
    """(header dict without __metadata__, metadata, {name: raw bytes}) in file order."""
    with open(path, "rb") as f:
        data = f.read()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", None)
    body = data[8 + n:]
    tensors = {}
    for k, v in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        a, b = v["data_offsets"]
        tensors[k] = body[a:b]
    return header, meta, tensors, sha(data)


class blocksize_patch:
    """Makes every Linear4bit built inside the context quantize with `bs` (see module doc)."""

    def __init__(self, bs):
        self.bs = bs

    def __enter__(self):
        self.orig = bnb.nn.Linear4bit.__init__
        bs, orig = self.bs, self.orig

        def init(mod, *a, **k):
            orig(mod, *a, **k)
            mod.weight.blocksize = bs

        bnb.nn.Linear4bit.__init__ = init

    def __exit__(self, *exc):
        bnb.nn.Linear4bit.__init__ = self.orig


def run_variant(v, work):
    src = os.path.join(MODELS, v["model"])
    kwargs = dict(v["bnb"])
    if "bnb_4bit_compute_dtype" in kwargs:
        kwargs["bnb_4bit_compute_dtype"] = DTYPES[kwargs["bnb_4bit_compute_dtype"]]
    cfg = BitsAndBytesConfig(**kwargs)
    fp_kwargs = dict(quantization_config=cfg, device_map="cpu")
    if v["dtype"]:
        fp_kwargs["dtype"] = DTYPES[v["dtype"]]
    bs = v["blocksize"]
    if bs and bs != 64:
        with blocksize_patch(bs):
            model = AutoModelForCausalLM.from_pretrained(src, **fp_kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(src, **fp_kwargs)
    out_dir = os.path.join(work, v["name"])
    model.save_pretrained(out_dir)
    header, meta, tensors, file_sha = read_safetensors(os.path.join(out_dir, "model.safetensors"))
    with open(os.path.join(out_dir, "config.json")) as f:
        config = json.load(f)
    rec = {
        "name": v["name"],
        "source": "tiny/models/" + v["model"],
        "bitsandbytes_config": v["bnb"],
        "from_pretrained_dtype": v["dtype"],
        "blocksize": bs,
        "quantization_config_to_dict": cfg.to_dict(),
        "config": config,
        "metadata": meta,
        "file_sha256": file_sha,
        "files": sorted(os.listdir(out_dir)),
        "tensors": [],
    }
    for k, b in tensors.items():
        t = {"name": k, "dtype": header[k]["dtype"], "shape": header[k]["shape"], "sha256": sha(b),
             "nbytes": len(b)}
        if len(b) <= SMALL:
            t["bytes"] = base64.b64encode(b).decode()
        rec["tensors"].append(t)
    return rec, out_dir


def reverse(v, out_dir):
    """Transformers reloads its own checkpoint; record bitsandbytes' dequantized weights."""
    model = AutoModelForCausalLM.from_pretrained(out_dir, device_map="cpu")
    deq = []
    first = True
    for name, mod in model.named_modules():
        if isinstance(mod, bnb.nn.Linear4bit):
            qs = mod.weight.quant_state
            w = F.dequantize_4bit(mod.weight.data, qs)  # in qs.dtype
            qs32 = copy.copy(qs)  # same state, float32 output
            qs32.dtype = torch.float32
            w32 = F.dequantize_4bit(mod.weight.data, qs32)
            assert w32.dtype == torch.float32
            # The float32 scales exactly as functional.dequantize_4bit derives them.
            if qs.nested:
                absmax = F.dequantize_blockwise(qs.absmax, qs.state2)
                absmax += qs.offset
            else:
                absmax = qs.absmax
            absmax = absmax.float()
            # bitsandbytes' reference (default, pure-torch) backend, which the CUDA kernel
            # matches: flat blocks over the whole tensor.
            ref = torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
                DEFAULT_KS, mod.weight.data, absmax, qs.blocksize, qs.quant_type, qs.shape, qs.dtype)
            ref32 = torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
                DEFAULT_KS, mod.weight.data, absmax, qs.blocksize, qs.quant_type, qs.shape,
                torch.float32)
            e = {"module": name, "kind": "4bit", "dtype": str(w.dtype).replace("torch.", ""),
                 "shape": list(w.shape), "absmax_f32_sha256": sha(raw(absmax)),
                 # what F.dequantize_4bit returns on this CPU-only machine (native CPU kernel)
                 "sha256_cpu_kernel": sha(raw(w)), "sha256_f32_cpu_kernel": sha(raw(w32)),
                 # bitsandbytes' reference backend (== CUDA rule)
                 "sha256": sha(raw(ref)), "sha256_f32": sha(raw(ref32))}
            w = ref
        elif isinstance(mod, bnb.nn.Linear8bitLt):
            cb, scb = mod.weight.data, mod.weight.SCB
            w = F.int8_vectorwise_dequant(cb, scb)
            e = {"module": name, "kind": "int8", "dtype": str(w.dtype).replace("torch.", ""),
                 "shape": list(w.shape), "sha256": sha(raw(w))}
        else:
            continue
        if first:
            e["bytes"] = base64.b64encode(raw(w)).decode()
            first = False
        deq.append(e)
    return deq, forward_check(model)


def forward_check(model):
    """One forward pass of a reloaded model. bitsandbytes 0.50.2 repacks 4-bit weights for its
    AVX512-BF16 CPU kernel on the first forward and fails when in_features is not a multiple of
    the block size (down_proj here: 160 = 2.5 blocks of 64); where that happens the repacking is
    switched off for the model (support_avx512bf16_for_cpu=False) and the pass repeated."""
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    rec = {"fast_cpu_path_error": None}
    try:
        with torch.no_grad():
            logits = model(ids).logits
    except RuntimeError as e:
        rec["fast_cpu_path_error"] = str(e)
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            logits = model(ids).logits
    rec["finite"] = bool(torch.isfinite(logits.float()).all())
    return rec


def main():
    os.makedirs(OUT, exist_ok=True)
    work = tempfile.mkdtemp(prefix="stowage-qfix-")
    index = {"generator": "tools/gen_quantized_checkpoint_fixtures.py",
             "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                          "bitsandbytes": bnb.__version__},
             "path": "real: from_pretrained(quantization_config=BitsAndBytesConfig, "
                     "device_map='cpu') + save_pretrained on a CPU-only machine",
             "variants": []}
    try:
        for v in VARIANTS:
            rec, out_dir = run_variant(v, work)
            vdir = os.path.join(OUT, v["name"])
            os.makedirs(vdir, exist_ok=True)
            if v["keep"]:
                shutil.copy(os.path.join(out_dir, "model.safetensors"), vdir)
                shutil.copy(os.path.join(out_dir, "config.json"), vdir)
                rec["dequantized"], rec["reload_forward"] = reverse(v, out_dir)
            with open(os.path.join(vdir, "expected.json"), "w") as f:
                json.dump(rec, f, indent=1, sort_keys=False)
                f.write("\n")
            index["variants"].append(v["name"])
            print(v["name"], len(rec["tensors"]), "tensors", rec["file_sha256"][:16])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with open(os.path.join(OUT, "index.json"), "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
