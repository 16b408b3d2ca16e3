"""Check, with the REAL Python libraries, files that stowage's writers produced.

Usage:
  /opt/stowage-tools-venv/bin/python tools/check_written.py convert OUT SRC DTYPE
      OUT: a folder written by stowage-convert; SRC: the folder/file it converted; DTYPE: the
      target (float16/bfloat16/float32). Loads every shard with safetensors.safe_open, checks
      the index, the {"format": "pt"} metadata, and that each tensor equals torch's
      SRC-tensor.to(DTYPE) bit for bit. Also loads OUT with transformers when SRC has a config.
  /opt/stowage-tools-venv/bin/python tools/check_written.py offload FOLDER
      FOLDER: an offload folder written by stowage; reads it with accelerate's
      OffloadedWeightsLoader / load_offloaded_weight.
Exits non-zero on any mismatch and prints what it checked.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors import safe_open


def load_source(src: str) -> dict:
    from accelerate.utils import load_state_dict  # noqa: F401  (import check only)

    files = []
    if os.path.isdir(src):
        idx = [f for f in os.listdir(src) if f.endswith(".index.json")]
        if os.path.exists(os.path.join(src, "model.safetensors")):
            files = [os.path.join(src, "model.safetensors")]
        elif idx:
            with open(os.path.join(src, idx[0])) as f:
                wm = json.load(f)["weight_map"]
            files = sorted({os.path.join(src, v) for v in wm.values()})
    else:
        files = [src]
    out = {}
    for f in files:
        if f.endswith(".safetensors"):
            with safe_open(f, "pt") as h:
                for k in h.keys():
                    out[k] = h.get_tensor(k)
        else:
            out.update(torch.load(f, weights_only=True))
    return out


def check_convert(out: str, src: str, dtype_name: str) -> int:
    dtype = getattr(torch, dtype_name)
    source = load_source(src)
    shards = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    seen = {}
    for s in shards:
        with safe_open(os.path.join(out, s), "pt") as h:
            md = h.metadata()
            if md != {"format": "pt"}:
                print(f"FAIL {s}: metadata {md}")
                return 1
            for k in h.keys():
                seen[k] = (s, h.get_tensor(k))
    if set(seen) != set(source):
        print(f"FAIL tensor names differ: {sorted(set(seen) ^ set(source))[:5]}")
        return 1
    bad = 0
    for k, (s, t) in seen.items():
        want = source[k].to(dtype) if source[k].is_floating_point() else source[k]
        if t.dtype != want.dtype or t.shape != want.shape or not torch.equal(
                t.contiguous().view(torch.uint8), want.contiguous().view(torch.uint8)):
            print(f"FAIL {k} in {s}")
            bad += 1
    idx = os.path.join(out, "model.safetensors.index.json")
    if len(shards) > 1:
        with open(idx) as f:
            ix = json.load(f)
        wm = ix["weight_map"]
        for k, (s, _) in seen.items():
            if wm.get(k) != s:
                print(f"FAIL index puts {k} in {wm.get(k)}, file is {s}")
                bad += 1
        total = sum(t.numel() * t.element_size() for _, t in seen.values())
        if ix["metadata"]["total_size"] != total:
            print(f"FAIL total_size {ix['metadata']['total_size']} != {total}")
            bad += 1
    if os.path.exists(os.path.join(out, "config.json")):
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
        sd = m.state_dict()
        for k, (s, t) in seen.items():
            if k in sd and not torch.equal(sd[k], t.to(sd[k].dtype)):
                print(f"FAIL transformers loaded {k} differently")
                bad += 1
        print(f"transformers.from_pretrained loaded {type(m).__name__} from {out}")
    print(f"{'OK' if bad == 0 else 'FAIL'}: {len(seen)} tensors in {len(shards)} shard(s) checked against "
          f"torch .to({dtype_name}) of {src}")
    return 1 if bad else 0


def check_offload(folder: str) -> int:
    from accelerate.utils import OffloadedWeightsLoader

    loader = OffloadedWeightsLoader(save_folder=folder)
    n = 0
    for k in loader.keys():
        t = loader[k]
        n += 1
        print(f"  {k}: {t.dtype} {tuple(t.shape)}")
    print(f"OK: accelerate read {n} tensors from {folder}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "convert":
        sys.exit(check_convert(sys.argv[2], sys.argv[3], sys.argv[4]))
    if len(sys.argv) == 3 and sys.argv[1] == "offload":
        sys.exit(check_offload(sys.argv[2]))
    print(__doc__)
    sys.exit(2)
