#!/usr/bin/env python3
"""Load checkpoints quantized by stowage-convert with the REAL transformers + bitsandbytes.

For each case, stowage-convert quantizes tests/fixtures/tiny/models/llama_gqa; the output is
loaded with AutoModelForCausalLM.from_pretrained(out, device_map="cpu") (Transformers reads
quantization_config from config.json and rebuilds Linear4bit / Linear8bitLt from the saved
keys), one forward pass runs, and its logits are compared with the same forward of the model
Transformers itself quantizes from the same source (from_pretrained(src,
quantization_config=...)). Prints one line per case and exits non-zero if a load fails or the
logits are not finite.

bitsandbytes 0.50.2 repacks 4-bit weights for its AVX512-BF16 CPU kernel on the first forward
and fails when in_features is not a multiple of the block size (down_proj here: 160 = 2.5
blocks of 64) -- for its own checkpoints as much as for stowage's. Where that error appears the
repacking is switched off (support_avx512bf16_for_cpu = False) and the pass repeated; the line
says so.

Run: /opt/stowage-tools-venv/bin/python tools/check_quantized_load.py BUILD/examples/convert/stowage-convert
"""
import logging
import os
import subprocess
import sys
import tempfile

logging.disable(logging.WARNING)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402
import bitsandbytes as bnb  # noqa: E402
import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
SRC = os.path.join(ROOT, "tests", "fixtures", "tiny", "models", "llama_gqa")

CASES = [
    ("nf4 double-quant bf16", ["--dtype", "nf4", "--double-quant", "--compute-dtype", "bfloat16"],
     dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
          bnb_4bit_compute_dtype=torch.bfloat16), torch.bfloat16),
    ("nf4 float32", ["--dtype", "nf4"], dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"), None),
    ("fp4 bf16 (fp16 compute)",
     ["--dtype", "fp4", "--compute-dtype", "float16", "--torch-dtype", "bfloat16"],
     dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype=torch.float16),
     torch.bfloat16),
    ("int8 bf16", ["--dtype", "int8", "--torch-dtype", "bfloat16"], dict(load_in_8bit=True),
     torch.bfloat16),
]


def forward(model):
    ids = torch.tensor([[1, 5, 9, 42, 7, 300, 11]])
    note = ""
    try:
        with torch.no_grad():
            return model(ids).logits.float(), note
    except RuntimeError as e:
        note = f" [bnb CPU fast path failed: {e}; repeated with support_avx512bf16_for_cpu=False]"
        for m in model.modules():
            if isinstance(m, bnb.nn.Linear4bit):
                m.support_avx512bf16_for_cpu = False
        with torch.no_grad():
            return model(ids).logits.float(), note


def main(argv):
    if len(argv) != 2:
        print(__doc__)
        return 2
    convert = argv[1]
    ok = True
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"bitsandbytes {bnb.__version__}, cuda available: {torch.cuda.is_available()}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, args, cfg, dtype in CASES:
            out = os.path.join(tmp, name.replace(" ", "_"))
            subprocess.run([convert, SRC, out, *args], check=True, stdout=subprocess.DEVNULL)
            try:
                ours = AutoModelForCausalLM.from_pretrained(out, device_map="cpu")
            except Exception as e:  # report, do not hide
                print(f"{name}: LOAD FAILED: {type(e).__name__}: {e}")
                ok = False
                continue
            kinds = sorted({type(m).__name__ for m in ours.modules()
                            if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))})
            logits, note = forward(ours)
            kw = dict(quantization_config=BitsAndBytesConfig(**cfg), device_map="cpu")
            if dtype is not None:
                kw["dtype"] = dtype
            ref_logits, ref_note = forward(AutoModelForCausalLM.from_pretrained(SRC, **kw))
            finite = bool(torch.isfinite(logits).all())
            diff = (logits - ref_logits).abs().max().item()
            ok = ok and finite
            print(f"{name}: loaded ({', '.join(kinds)}), forward finite={finite}, "
                  f"max |logits - transformers' own quantization| = {diff:.3g}{note}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
