"""Generate tests/fixtures/load/ with the REAL accelerate / transformers / torch.

Run with the tools venv:  /opt/stowage-tools-venv/bin/python tools/gen_load_fixtures.py

What it writes (well under 2 MB):
  f1_st/model.safetensors, f1_bin/pytorch_model.bin
        accelerate's ModelForTest (Linear(3,4), BatchNorm1d(4), Linear(4,5)) with seeded weights
        and non-trivial BatchNorm statistics, saved with safetensors.torch.save_file / torch.save
  llama_st/   a tiny tied Llama saved by transformers save_pretrained(max_shard_size="12KB")
  llama_bin/  the same state dict as pytorch_model-0000i-of-0000n.bin shards (huggingface_hub's
              splitter + torch.save) with pytorch_model.bin.index.json
  cases.json  one record per load: the checkpoint, device map and options, then
                accelerate: what accelerate.load_checkpoint_in_model / load_checkpoint_and_dispatch
                            left in the model (device, dtype, bytes as hex) for every state-dict
                            name, its offload index.json and the bytes of every .dat it wrote;
                expected:   for every state-dict name, the dtype and bytes stowage must produce,
                            computed by torch (.to(dtype) of the checkpoint tensor) under
                            stowage's documented rules. They equal accelerate's results except
                            where `differences` says why (accelerate-spec §9.11, §9.12, and the
                            disk dtype: accelerate's .dat keep the checkpoint dtype).
Expected values come from torch/accelerate, never from stowage.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from torch import nn

import accelerate
import transformers
from accelerate import init_empty_weights, load_checkpoint_and_dispatch
from accelerate.utils import load_checkpoint_in_model
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "load")


class ModelForTest(nn.Module):
    """accelerate's ModelForTest (accelerate-cases F1)."""

    def __init__(self):
        super().__init__()
        self.linear1 = nn.Linear(3, 4)
        self.batchnorm = nn.BatchNorm1d(4)
        self.linear2 = nn.Linear(4, 5)


def hexof(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().tobytes().hex()
    return t.numpy().tobytes().hex()


def dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def keep_fp32(keep, name):
    # accelerate's test in load_checkpoint_in_model
    return any((k in name and k + "." in name) or k == name for k in keep)


def f1_state_dict():
    torch.manual_seed(0)
    m = ModelForTest()
    with torch.no_grad():
        m.batchnorm.running_mean.copy_(torch.tensor([0.5, -1.25, 2.0, 0.125]))
        m.batchnorm.running_var.copy_(torch.tensor([1.5, 0.25, 3.0, 0.75]))
        m.batchnorm.num_batches_tracked.fill_(7)
        m.batchnorm.weight.copy_(torch.tensor([1.1, 0.9, 1.3, 0.7]))
        m.batchnorm.bias.copy_(torch.tensor([0.01, -0.02, 0.03, -0.04]))
    return {k: v.clone() for k, v in m.state_dict().items()}


def tiny_llama_config():
    return transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True,
    )


def save_llama():
    torch.manual_seed(1)
    cfg = tiny_llama_config()
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # non-trivial norms so keep_in_fp32 is visible in the bytes
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.01 * torch.randn_like(p))
    st_dir = os.path.join(OUT, "llama_st")
    model.save_pretrained(st_dir, max_shard_size="12KB")
    for f in os.listdir(st_dir):
        if f == "generation_config.json":
            os.remove(os.path.join(st_dir, f))
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    bin_dir = os.path.join(OUT, "llama_bin")
    os.makedirs(bin_dir, exist_ok=True)
    split = split_torch_state_dict_into_shards(sd, filename_pattern="pytorch_model{suffix}.bin", max_shard_size="12KB")
    for fname, keys in split.filename_to_tensors.items():
        torch.save({k: sd[k] for k in keys}, os.path.join(bin_dir, fname))
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    with open(os.path.join(bin_dir, "pytorch_model.bin.index.json"), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
        f.write("\n")
    shutil.copy(os.path.join(st_dir, "config.json"), os.path.join(bin_dir, "config.json"))
    return sd, cfg


def record_model(model):
    out = {}
    sd = model.state_dict(keep_vars=True)
    for name, t in sd.items():
        e = {"device": t.device.type, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
        if t.device.type != "meta":
            e["hex"] = hexof(t)
        out[name] = e
    return out


def record_folder(folder):
    if not os.path.isdir(folder):
        return None, {}
    idx_path = os.path.join(folder, "index.json")
    index = json.load(open(idx_path)) if os.path.exists(idx_path) else None
    dats = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".dat"):
            dats[f[:-4]] = open(os.path.join(folder, f), "rb").read().hex()
    return index, dats


def expected_for(sd_ckpt, model_sd_names, model_dtypes, dtype, keep, tied):
    """stowage's documented result: torch's .to() of the checkpoint value."""
    exp = {}
    for name in model_sd_names:
        src = name if name in sd_ckpt else tied.get(name)
        if src is None or src not in sd_ckpt:
            continue
        v = sd_ckpt[src]
        if v.is_floating_point():
            if dtype is not None:
                target = torch.float32 if keep and keep_fp32(keep, name) else dtype
            else:
                target = model_dtypes[name]
        else:
            target = v.dtype
        c = v.to(target)
        exp[name] = {"dtype": dtype_name(target), "shape": list(c.shape), "hex": hexof(c)}
    return exp


def run_case(cases, case_id, build, ckpt_rel, device_map, dtype=None, keep=None, offload_buffers=False,
             api="load_checkpoint_in_model", sd_ckpt=None, tied=None, notes=None):
    tmp = tempfile.mkdtemp()
    folder = os.path.join(tmp, "offload")
    model = build()
    names = list(model.state_dict().keys())
    model_dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    ckpt = os.path.join(OUT, ckpt_rel)
    if api == "load_checkpoint_in_model":
        load_checkpoint_in_model(model, ckpt, device_map=device_map, offload_folder=folder, dtype=dtype,
                                 offload_buffers=offload_buffers, keep_in_fp32_modules=keep)
    else:
        model = load_checkpoint_and_dispatch(model, ckpt, device_map=device_map, offload_folder=folder, dtype=dtype,
                                             offload_buffers=offload_buffers)
    index, dats = record_folder(folder)
    # accelerate's .dat keep the checkpoint dtype; what they hold, converted by torch to the
    # dtype stowage writes, is the expected content of stowage's files.
    rec = {
        "id": case_id,
        "api": api,
        "checkpoint": ckpt_rel,
        "device_map": device_map,
        "dtype": None if dtype is None else dtype_name(dtype),
        "keep_in_fp32_modules": keep or [],
        "offload_buffers": offload_buffers,
        "accelerate": {"tensors": record_model(model), "offload_index": index, "offload_dat": dats},
        "expected": expected_for(sd_ckpt, names, model_dtypes, dtype, keep, tied or {}),
        "checkpoint_values": {k: {"dtype": dtype_name(v.dtype), "hex": hexof(v)} for k, v in sd_ckpt.items()},
        "notes": notes or [],
    }
    cases.append(rec)
    shutil.rmtree(tmp)


def main():
    if os.path.isdir(OUT):
        shutil.rmtree(OUT)
    os.makedirs(OUT)
    sd = f1_state_dict()
    os.makedirs(os.path.join(OUT, "f1_st"))
    save_file(sd, os.path.join(OUT, "f1_st", "model.safetensors"), metadata={"format": "pt"})
    os.makedirs(os.path.join(OUT, "f1_bin"))
    torch.save(sd, os.path.join(OUT, "f1_bin", "pytorch_model.bin"))
    llama_sd, cfg = save_llama()

    def build_f1():
        with init_empty_weights(include_buffers=False):
            return ModelForTest()

    def build_llama():
        with init_empty_weights():
            m = transformers.LlamaForCausalLM(cfg)
        m.tie_weights()  # transformers 5 ties at from_pretrained time; accelerate needs it done
        assert m.lm_head.weight is m.model.embed_tokens.weight
        return m

    f1_map = {"linear1": "cpu", "batchnorm": "disk", "linear2": "cpu"}
    cases = []
    run_case(cases, "f1_st_disk", build_f1, "f1_st", f1_map, sd_ckpt=sd,
             notes=["§9.11: accelerate leaves batchnorm buffers at their init values; stowage loads them"])
    run_case(cases, "f1_st_disk_buffers", build_f1, "f1_st/model.safetensors", f1_map, offload_buffers=True, sd_ckpt=sd)
    run_case(cases, "f1_bin_fp16_disk_buffers", build_f1, "f1_bin", f1_map, dtype=torch.float16, offload_buffers=True,
             sd_ckpt=sd, notes=["disk dtype: accelerate's .dat keep float32; stowage writes float16"])
    llama_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                 "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    tied = {"lm_head.weight": "model.embed_tokens.weight"}
    run_case(cases, "llama_st_fp16_keep", build_llama, "llama_st", llama_map, dtype=torch.float16, keep=["norm"],
             sd_ckpt=llama_sd, tied=tied,
             notes=["keep_in_fp32 float32 tensors on disk are served from the safetensors file"])
    run_case(cases, "llama_st_bf16_keep", build_llama, "llama_st/model.safetensors.index.json", llama_map,
             dtype=torch.bfloat16, keep=["norm"], sd_ckpt=llama_sd, tied=tied,
             notes=["§9.12: accelerate ignores keep_in_fp32_modules for bfloat16; stowage keeps them float32"])
    run_case(cases, "llama_bin_bf16_dispatch", build_llama, "llama_bin", llama_map, dtype=torch.bfloat16,
             api="load_checkpoint_and_dispatch", sd_ckpt=llama_sd, tied=tied)
    run_case(cases, "llama_st_all_cpu", build_llama, "llama_st", {"": "cpu"}, dtype=None, sd_ckpt=llama_sd, tied=tied)
    with open(os.path.join(OUT, "cases.json"), "w") as f:
        json.dump({"versions": {"torch": torch.__version__, "accelerate": accelerate.__version__,
                                "transformers": transformers.__version__, "numpy": np.__version__},
                   "cases": cases}, f, indent=1, sort_keys=False)
        f.write("\n")
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(OUT) for f in fs)
    print(f"wrote {OUT} ({total} bytes)")


if __name__ == "__main__":
    sys.exit(main())
