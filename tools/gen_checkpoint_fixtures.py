"""Generate the checkpoint fixtures under tests/fixtures/checkpoints/ with the REAL Python tools.

Run with the tools venv:  /opt/stowage-tools-venv/bin/python tools/gen_checkpoint_fixtures.py

What it writes (all small; the total stays well under 3 MB):
  st/          safetensors files written by safetensors.torch.save_file (every dtype, scalars,
               empty tensors, metadata) + <name>.expected.json (tensor bytes as hex)
  torch/       torch.save state dicts (zip format: tied/shared storages, a non-contiguous view,
               bf16, int64, bool, float8 via UntypedStorage, an nn.Module state dict with
               _metadata) + expected JSON; legacy formats (non-zip pickle, tar, PYTORCH1)
  hf_llama_st/ and hf_llama_bin/   a tiny Llama saved by transformers save_pretrained with a
               small max_shard_size (safetensors), and the same state dict sharded as .bin
               (huggingface_hub's splitter + torch.save, the layout transformers 4.x wrote)
  convert/     fp32 -> fp16/bf16 bit vectors from torch's tensor .to() (vectorised CPU path),
               and the reference output of `stowage-convert hf_llama_st out --dtype bfloat16
               --max-shard-size 5KB` made with torch .to() + huggingface_hub splitting + save_file
  offload/     an accelerate offload folder written by accelerate.utils.offload_state_dict
  bad/         malformed and hostile files (handcrafted here) + catalogue.json with, for each,
               the format, what Python's own reader said, and the error text stowage must give
Expected values come from torch/safetensors/accelerate, never from stowage.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
import struct
import sys
import tarfile
import zipfile
from collections import OrderedDict

import torch

import safetensors
from safetensors.torch import save_file, load_file
from huggingface_hub import split_torch_state_dict_into_shards

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "checkpoints")
ROOT = os.path.normpath(ROOT)

# The 8-byte view type used to dump each dtype's raw bytes through numpy.
RAW_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def raw_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    if t.dtype == torch.bool:
        return t.to(torch.uint8).numpy().tobytes()
    if t.dtype == torch.complex64:
        return torch.view_as_real(t).numpy().tobytes()
    flat = t.reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def describe(sd: "OrderedDict[str, torch.Tensor]", metadata=None) -> dict:
    out = {"tensors": []}
    if metadata is not None:
        out["metadata"] = metadata
    for k, v in sd.items():
        out["tensors"].append({"name": k, "dtype": dtype_name(v.dtype), "shape": list(v.shape),
                               "hex": raw_bytes(v).hex()})
    return out


def write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def fresh(sub: str) -> str:
    d = os.path.join(ROOT, sub)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def gen_safetensors() -> None:
    d = fresh("st")
    g = torch.Generator().manual_seed(1)
    sd = OrderedDict()
    sd["f32.matrix"] = torch.randn(3, 5, generator=g)
    sd["f32.scalar"] = torch.tensor(3.25)
    sd["f32.empty"] = torch.zeros(0, 4)
    sd["f64.vec"] = torch.randn(4, generator=g, dtype=torch.float64)
    sd["f16.vec"] = torch.randn(7, generator=g).half()
    sd["bf16.matrix"] = torch.randn(2, 3, generator=g).bfloat16()
    sd["i64.vec"] = torch.tensor([-(2 ** 62), -1, 0, 7, 2 ** 40])
    sd["i32.vec"] = torch.tensor([-5, 6, 2 ** 30], dtype=torch.int32)
    sd["i16.vec"] = torch.tensor([-300, 301], dtype=torch.int16)
    sd["i8.vec"] = torch.tensor([-128, 0, 127], dtype=torch.int8)
    sd["u8.vec"] = torch.tensor([0, 1, 255], dtype=torch.uint8)
    sd["bool.vec"] = torch.tensor([True, False, True, True])
    sd["bool.scalar"] = torch.tensor(False)
    sd["f8e4m3.vec"] = torch.tensor([0.5, -1.0, 448.0]).to(torch.float8_e4m3fn)
    sd["f8e5m2.vec"] = torch.tensor([0.25, -3.0]).to(torch.float8_e5m2)
    sd["u16.vec"] = torch.tensor([1, 65535], dtype=torch.uint16)
    sd["u32.vec"] = torch.tensor([1, 2 ** 32 - 1], dtype=torch.uint32)
    sd["u64.vec"] = torch.tensor([1, 2 ** 63], dtype=torch.uint64)
    sd["c64.vec"] = torch.tensor([1 + 2j, -0.5j], dtype=torch.complex64)
    sd["a.first_name"] = torch.ones(2)  # name ordering inside one dtype
    meta = {"format": "pt"}
    save_file(dict(sd), os.path.join(d, "dtypes.safetensors"), metadata=meta)
    write_json(os.path.join(d, "dtypes.expected.json"), describe(sd, meta))

    # No metadata at all, and an empty file (header "{}").
    sd2 = OrderedDict([("only", torch.arange(6, dtype=torch.float32).reshape(2, 3))])
    save_file(dict(sd2), os.path.join(d, "nometa.safetensors"))
    write_json(os.path.join(d, "nometa.expected.json"), describe(sd2))
    save_file({}, os.path.join(d, "empty.safetensors"))
    write_json(os.path.join(d, "empty.expected.json"), describe(OrderedDict()))
    save_file({}, os.path.join(d, "empty_meta.safetensors"), metadata={"framework": "pt"})
    write_json(os.path.join(d, "empty_meta.expected.json"),
               describe(OrderedDict(), {"framework": "pt"}))
    # A non-ASCII tensor name and metadata value (serde writes UTF-8 unescaped).
    sd3 = OrderedDict([("poids.é", torch.tensor([1.5], dtype=torch.float16))])
    save_file(dict(sd3), os.path.join(d, "utf8.safetensors"), metadata={"note": "ünïcode \"q\""})
    write_json(os.path.join(d, "utf8.expected.json"), describe(sd3, {"note": "ünïcode \"q\""}))


def gen_torch() -> None:
    d = fresh("torch")
    g = torch.Generator().manual_seed(2)
    base = torch.randn(4, 6, generator=g)
    sd = OrderedDict()
    sd["w"] = base
    sd["w_tied"] = base  # same storage, same view
    sd["w_row"] = base[1]  # same storage, storage_offset 6
    sd["w_t"] = base.t()  # non-contiguous view (strides (1, 6))
    sd["w_cols"] = base[:, 2:4]  # non-contiguous slice with offset 2
    sd["bf16"] = torch.randn(3, 2, generator=g).bfloat16()
    sd["f16"] = torch.randn(5, generator=g).half()
    sd["f64"] = torch.randn(2, generator=g, dtype=torch.float64)
    sd["i64"] = torch.tensor([[1, -2], [3, 2 ** 50]])
    sd["i32"] = torch.tensor([7, -8], dtype=torch.int32)
    sd["u8"] = torch.tensor([9, 200], dtype=torch.uint8)
    sd["i8"] = torch.tensor([-9], dtype=torch.int8)
    sd["i16"] = torch.tensor([-1000, 5], dtype=torch.int16)
    sd["bool"] = torch.tensor([True, False, False])
    sd["scalar"] = torch.tensor(2.5)
    sd["empty"] = torch.zeros(0, 3)
    sd["f8"] = torch.tensor([1.0, -2.0, 0.125]).to(torch.float8_e4m3fn)  # UntypedStorage + _v3
    sd["u16"] = torch.tensor([3, 60000], dtype=torch.uint16)  # UntypedStorage + _v3
    torch.save(sd, os.path.join(d, "state_dict.bin"))
    write_json(os.path.join(d, "state_dict.expected.json"), describe(sd))

    # An nn.Module state dict: carries the `_metadata` attribute (BUILD on the OrderedDict).
    torch.manual_seed(3)
    m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.LayerNorm(2))
    msd = m.state_dict()
    torch.save(msd, os.path.join(d, "module.bin"))
    write_json(os.path.join(d, "module.expected.json"), describe(OrderedDict(msd)))

    # A plain dict (not an OrderedDict) with one tensor: EMPTY_DICT + SETITEM.
    pd = {"x": torch.tensor([1.0, 2.0])}
    torch.save(pd, os.path.join(d, "plain_dict.bin"))
    write_json(os.path.join(d, "plain_dict.expected.json"), describe(OrderedDict(pd)))

    # The same dict as a big-endian archive: byteorder "big", storage bytes swapped. torch.load
    # must give the same values back (checked here), so the C++ reader has a real target.
    with zipfile.ZipFile(os.path.join(d, "plain_dict.bin")) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    big = []
    for name, data in members:
        if name.endswith("/byteorder"):
            data = b"big"
        elif "/data/" in name and not name.endswith("serialization_id"):
            data = b"".join(data[i:i + 4][::-1] for i in range(0, len(data), 4))
        big.append((name, data))
    with open(os.path.join(d, "big_endian.bin"), "wb") as f:
        f.write(zip_with(big))
    back = torch.load(os.path.join(d, "big_endian.bin"), weights_only=True)
    assert torch.equal(back["x"], pd["x"]), "torch.load disagrees on the big-endian archive"

    # Legacy formats, refused by name.
    torch.save(pd, os.path.join(d, "legacy.bin"), _use_new_zipfile_serialization=False)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name in ("storages", "tensors", "pickle"):
            data = b"\x80\x02]q\x00."
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    with open(os.path.join(d, "legacy_tar.bin"), "wb") as f:
        f.write(buf.getvalue())
    with open(os.path.join(d, "preview.bin"), "wb") as f:
        f.write(b"PYTORCH1" + b"\x00" * 24)


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(4)
    return LlamaForCausalLM(cfg)


def gen_hf() -> None:
    model = tiny_llama()
    d = fresh("hf_llama_st")
    model.save_pretrained(d, max_shard_size="10KB")
    for extra in ("generation_config.json",):
        p = os.path.join(d, extra)
        if os.path.exists(p):
            os.remove(p)  # keep only config.json + weights: smaller fixture
    sd = OrderedDict((k, v.detach()) for k, v in model.state_dict().items())
    write_json(os.path.join(d, "..", "hf_llama.expected.json"), describe(sd))

    # The .bin form, as transformers 4.x save_pretrained(safe_serialization=False) wrote it.
    d = fresh("hf_llama_bin")
    shutil.copy(os.path.join(ROOT, "hf_llama_st", "config.json"), d)
    split = split_torch_state_dict_into_shards(sd, filename_pattern="pytorch_model{suffix}.bin",
                                               max_shard_size="10KB")
    for fname, keys in split.filename_to_tensors.items():
        torch.save({k: sd[k].contiguous() for k in keys}, os.path.join(d, fname))
    index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
    with open(os.path.join(d, "pytorch_model.bin.index.json"), "w") as f:
        f.write(json.dumps(index, indent=2, sort_keys=True) + "\n")


def f32_bits_tensor(bits):
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def gen_convert() -> None:
    d = fresh("convert")
    edge = [0x00000000, 0x80000000, 0x3f800000, 0xbf800000, 0x3f808000, 0x3f818000, 0x3f808001,
            0x7f7f8000, 0x7f7f7fff, 0x00018000, 0x00008000, 0x00000001, 0x80000001, 0x007fffff,
            0x3f801000, 0x3f803000, 0x3f802000, 0x3f801001, 0x33400000, 0x33c00000, 0x387fe000,
            0x477fefff, 0x477ff000, 0xc77ff000, 0x33000000, 0x33000001, 0x38800000, 0x387fffff,
            0x7f800000, 0xff800000, 0x7f7fffff, 0xff7fffff, 0x47800000, 0x477fe000,
            0x7fc00000, 0xffc00000, 0x7f800001, 0xff812345, 0x7fffffff, 0x7fa00000, 0xffffffff]
    rnd = random.Random(5)
    for _ in range(3000):
        edge.append(rnd.getrandbits(32))
    for _ in range(1000):  # bias towards the fp16 range and its subnormals
        e = rnd.randint(90, 145)
        edge.append((rnd.getrandbits(1) << 31) | (e << 23) | rnd.getrandbits(23))
    f = f32_bits_tensor(edge)
    h = f.to(torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    b = f.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    # Widening back (exact) from every 16-bit pattern is checked in C++ against these too.
    vec = {"f32": [f"{x:08x}" for x in edge], "f16": [f"{int(x):04x}" for x in h.tolist()],
           "bf16": [f"{int(x):04x}" for x in b.tolist()]}
    all16 = torch.arange(0, 65536, dtype=torch.int64).to(torch.int32).to(torch.int16)
    hw = all16.view(torch.float16).to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    vec["f16_to_f32_every_pattern"] = "".join(f"{int(x):08x}" for x in hw.tolist())
    vec["torch_version"] = torch.__version__
    with open(os.path.join(d, "fp32_narrowing.json"), "w") as fp:
        json.dump(vec, fp)

    # Reference output of stowage-convert (hf_llama_st -> bfloat16 shards of <= 5KB):
    # tensors in source order (shards sorted by name, tensors in each file's data order),
    # floating tensors .to(dtype), huggingface_hub's splitter, save_file with {"format": "pt"},
    # index as transformers writes it (indent 2, sorted keys, newline).
    src = os.path.join(ROOT, "hf_llama_st")
    out = os.path.join(d, "llama_bf16")
    os.makedirs(out)
    shards = sorted(f for f in os.listdir(src) if f.endswith(".safetensors"))
    sd = OrderedDict()
    for s in shards:
        path = os.path.join(src, s)
        with open(path, "rb") as fp:
            n = struct.unpack("<Q", fp.read(8))[0]
            header = json.loads(fp.read(n))
        names = sorted((k for k in header if k != "__metadata__"),
                       key=lambda k: tuple(header[k]["data_offsets"]))
        loaded = load_file(path)
        for k in names:
            t = loaded[k]
            sd[k] = t.to(torch.bfloat16) if t.is_floating_point() else t
    split = split_torch_state_dict_into_shards(sd, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size="5KB")
    for fname, keys in split.filename_to_tensors.items():
        save_file({k: sd[k].contiguous() for k in keys}, os.path.join(out, fname),
                  metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as fp:
            fp.write(json.dumps(index, indent=2, sort_keys=True) + "\n")
    shutil.copy(os.path.join(src, "config.json"), out)


def gen_offload() -> None:
    from accelerate.utils import offload_state_dict

    d = fresh("offload")
    sd = OrderedDict()
    sd["h.0.attn.c_attn.weight"] = torch.tensor([[1.0, -2.5, 3.0], [0.5, 0.25, -0.125]])
    sd["h.0.ln.weight"] = torch.tensor([[1.0, -2.5, 3.0]]).bfloat16()
    sd["h.0.half"] = torch.tensor([1.0, -2.5]).half()
    sd["mask"] = torch.tensor([True, False, True])
    sd["step"] = torch.tensor(7)
    sd["f64"] = torch.tensor([1e100], dtype=torch.float64)
    sd["i8"] = torch.tensor([-3, 4], dtype=torch.int8)
    sd["f8"] = torch.tensor([1.0, -0.5]).to(torch.float8_e4m3fn)
    offload_state_dict(os.path.join(d, "folder"), sd)
    write_json(os.path.join(d, "folder.expected.json"), describe(sd))


# ---------------------------------------------------------------- malformed / hostile files
def st_file(header: bytes, data: bytes = b"", n=None) -> bytes:
    return struct.pack("<Q", len(header) if n is None else n) + header + data


def pad8(h: bytes) -> bytes:
    return h + b" " * ((8 - len(h) % 8) % 8)


def python_st_verdict(path: str) -> str:
    try:
        load_file(path)
        return "accepted"
    except Exception as e:  # noqa: BLE001 - we record whatever the reference says
        return f"{type(e).__name__}: {e}"


def python_torch_verdict(path: str) -> str:
    try:
        torch.load(path, weights_only=True)
        return "accepted"
    except Exception as e:  # noqa: BLE001
        msg = str(e).splitlines()[0] if str(e) else ""
        return f"{type(e).__name__}: {msg[:200]}"


def zip_with(entries, compress=zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compress) as z:
        for name, data in entries:
            z.writestr(name, data)
    return buf.getvalue()


def pk_global(mod: str, name: str) -> bytes:
    return b"c" + mod.encode() + b"\n" + name.encode() + b"\n"


def pk_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def pk_int(i: int) -> bytes:
    if -(2 ** 31) <= i < 2 ** 31:
        return b"J" + struct.pack("<i", i)
    return b"\x8a\x08" + struct.pack("<q", i)  # LONG1, 8 bytes


def pk_tuple(items) -> bytes:
    return b"(" + b"".join(items) + b"t"


def tensor_pickle(key: str, storage_numel: int, offset: int, size, stride,
                  storage_cls: str = "FloatStorage", name: str = "t") -> bytes:
    persid = pk_tuple([pk_str("storage"), pk_global("torch", storage_cls), pk_str(key), pk_str("cpu"),
                       pk_int(storage_numel)]) + b"Q"
    args = pk_tuple([persid, pk_int(offset), pk_tuple([pk_int(s) for s in size]),
                     pk_tuple([pk_int(s) for s in stride]), b"\x89",
                     pk_global("collections", "OrderedDict") + b")R"])
    body = pk_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"
    return (b"\x80\x02" + pk_global("collections", "OrderedDict") + b")R" + pk_str(name) + body +
            b"s.")


def gen_bad() -> None:
    d = fresh("bad")
    cat = []

    def add_st(name, blob, expect, note):
        p = os.path.join(d, name)
        with open(p, "wb") as f:
            f.write(blob)
        cat.append({"file": name, "format": "safetensors", "expect": expect, "note": note,
                    "python": python_st_verdict(p)})

    def add_torch(name, blob, expect, note):
        p = os.path.join(d, name)
        with open(p, "wb") as f:
            f.write(blob)
        cat.append({"file": name, "format": "torch", "expect": expect, "note": note,
                    "python": python_torch_verdict(p)})

    t = lambda name, dt, shape, b, e: (f'"{name}":{{"dtype":"{dt}","shape":{json.dumps(shape)},'
                                       f'"data_offsets":[{b},{e}]}}')
    add_st("too_small.safetensors", b"\x10\x00\x00", "header too small", "file shorter than 8 bytes")
    add_st("too_large.safetensors", struct.pack("<Q", 100_000_001) + b"{}", "header too large",
           "N above 100,000,000")
    add_st("length_past_end.safetensors", st_file(b"{}      ", n=64), "invalid header length",
           "8+N past the end of the file")
    add_st("huge_length.safetensors", struct.pack("<Q", 2 ** 64 - 1) + b"{}", "header too large",
           "N not representable")
    add_st("bad_utf8.safetensors", st_file(pad8(b'{"\xff\xfe":1}')), "invalid UTF-8",
           "header not UTF-8")
    add_st("not_json.safetensors", st_file(pad8(b"{not json")), "invalid JSON", "syntax error")
    add_st("not_object.safetensors", st_file(pad8(b"[1,2]")), "invalid JSON", "header is an array")
    add_st("unknown_dtype.safetensors",
           st_file(pad8(("{" + t("a", "F33", [1], 0, 4) + "}").encode()), b"\0" * 4),
           "invalid JSON", "dtype string not in the enum")
    add_st("meta_not_string.safetensors",
           st_file(pad8(b'{"__metadata__":{"format":1}}')), "invalid JSON",
           "__metadata__ value not a string")
    add_st("negative_shape.safetensors",
           st_file(pad8(('{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}').encode()),
                   b"\0" * 4), "invalid JSON", "negative dimension")
    add_st("offsets_arity.safetensors",
           st_file(pad8(('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4,8]}}').encode()),
                   b"\0" * 4), "invalid JSON", "data_offsets with three numbers")
    add_st("missing_field.safetensors",
           st_file(pad8(('{"a":{"dtype":"F32","data_offsets":[0,4]}}').encode()), b"\0" * 4),
           "invalid JSON", "no shape")
    add_st("trailing_garbage.safetensors", st_file(pad8(b"{} x")), "invalid JSON",
           "text after the object")
    add_st("hole.safetensors",
           st_file(pad8(("{" + t("a", "F32", [1], 0, 4) + "," + t("b", "F32", [1], 8, 12) + "}").encode()),
                   b"\0" * 12), "invalid offset", "gap between tensors")
    add_st("not_from_zero.safetensors",
           st_file(pad8(("{" + t("a", "F32", [1], 4, 8) + "}").encode()), b"\0" * 8),
           "invalid offset", "first tensor does not start at 0")
    add_st("overlap.safetensors",
           st_file(pad8(("{" + t("a", "F32", [2], 0, 8) + "," + t("b", "F32", [1], 4, 8) + "}").encode()),
                   b"\0" * 8), "invalid offset", "overlapping tensors")
    add_st("end_before_begin.safetensors",
           st_file(pad8(("{" + t("a", "F32", [0], 4, 0) + "}").encode()), b"\0" * 4),
           "invalid offset", "end < begin")
    add_st("size_mismatch.safetensors",
           st_file(pad8(("{" + t("a", "F32", [2], 0, 4) + "}").encode()), b"\0" * 4),
           "invalid shape, data type, or offset", "END-BEGIN != numel*4")
    add_st("overflow.safetensors",
           st_file(pad8(("{" + t("a", "F32", [2 ** 32, 2 ** 32], 0, 4) + "}").encode()), b"\0" * 4),
           "overflow", "numel*bits overflows 64 bits")
    add_st("misaligned_f4.safetensors",
           st_file(pad8(("{" + t("a", "F4", [3], 0, 2) + "}").encode()), b"\0" * 2),
           "misaligned", "3 four-bit elements are 12 bits")
    add_st("trailing_bytes.safetensors",
           st_file(pad8(("{" + t("a", "F32", [1], 0, 4) + "}").encode()), b"\0" * 6),
           "not fully covered", "bytes after the last tensor (polyglot)")
    add_st("truncated.safetensors",
           st_file(pad8(("{" + t("a", "F32", [4], 0, 16) + "}").encode()), b"\0" * 10),
           "not fully covered", "data shorter than the header says")
    add_st("duplicate_name.safetensors",
           st_file(pad8(("{" + t("a", "F32", [1], 0, 4) + "," + t("a", "F32", [1], 0, 4) + "}").encode()),
                   b"\0" * 4), "duplicate tensor name", "same name twice, identical offsets")
    add_st("duplicate_metadata.safetensors",
           st_file(pad8(b'{"__metadata__":{"a":"b"},"__metadata__":{"a":"c"}}')), "duplicate",
           "__metadata__ twice")
    add_st("deep_rank.safetensors",
           st_file(pad8(("{" + t("a", "F32", [1] * 9, 0, 4) + "}").encode()), b"\0" * 4),
           "rank", "nine dimensions (stowage's shape holds at most 8)")

    # --- torch zip: hostile and malformed
    good = os.path.join(ROOT, "torch", "plain_dict.bin")
    with zipfile.ZipFile(good) as z:
        members = [(i.filename, z.read(i.filename)) for i in z.infolist()]
    prefix = members[0][0].split("/")[0]
    data0 = dict(members)[f"{prefix}/data/0"]

    def with_pkl(pkl: bytes, extra=None):
        ents = [(f"{prefix}/data.pkl", pkl), (f"{prefix}/data/0", data0), (f"{prefix}/version", b"3\n")]
        return zip_with(ents + (extra or []))

    add_torch("os_system.bin",
              with_pkl(b"\x80\x02" + pk_global("os", "system") + pk_str("echo pwned") + b"\x85R."),
              "global `os.system` is not allowed", "GLOBAL os.system + REDUCE")
    add_torch("builtins_eval.bin",
              with_pkl(b"\x80\x02" + pk_global("builtins", "eval") + pk_str("1+1") + b"\x85R."),
              "global `builtins.eval` is not allowed", "REDUCE of eval")
    add_torch("reduce_on_dtype.bin",
              with_pkl(b"\x80\x02" + pk_global("torch", "float32") + b")R."),
              "REDUCE", "REDUCE of an allow-listed non-callable (torch.float32)")
    add_torch("stack_global.bin",
              with_pkl(b"\x80\x04" + b"\x8c\x02os\x94\x8c\x06system\x94\x93."),
              "unsupported pickle opcode", "protocol-4 STACK_GLOBAL")
    add_torch("missing_storage.bin",
              with_pkl(tensor_pickle("7", 2, 0, [2], [1])), "storage `7`",
              "persistent id names data/7, absent from the archive")
    add_torch("storage_overrun.bin",
              with_pkl(tensor_pickle("0", 2, 0, [100], [1])), "outside its storage",
              "a view of 100 elements on a 2-element storage")
    add_torch("storage_numel_lies.bin",
              with_pkl(tensor_pickle("0", 1000, 0, [1000], [1])), "storage `0`",
              "persistent id claims 1000 elements; data/0 holds 8 bytes")
    add_torch("negative_stride.bin",
              with_pkl(tensor_pickle("0", 2, 1, [2], [-1])), "negative stride",
              "stride -1")
    add_torch("offset_overflow.bin",
              with_pkl(tensor_pickle("0", 2, 2 ** 31 - 1, [2 ** 31 - 1, 2 ** 31 - 1], [2 ** 31 - 1, 1])),
              "outside its storage", "offset + extent far beyond the storage")
    add_torch("broadcast_view.bin",
              with_pkl(tensor_pickle("0", 2, 0, [2 ** 40], [0])), "overlapping or broadcast",
              "2^40 elements with stride 0 on a 2-element storage (4 TiB if copied out)")
    add_torch("unknown_storage_class.bin",
              with_pkl(tensor_pickle("0", 2, 0, [2], [1], storage_cls="QInt8Storage")),
              "not allowed", "quantized storage class")
    add_torch("truncated_pickle.bin", with_pkl(tensor_pickle("0", 2, 0, [2], [1])[:-9]),
              "pickle", "data.pkl cut short (no STOP)")
    add_torch("compressed.bin", zip_with(members, compress=zipfile.ZIP_DEFLATED),
              "compressed", "entries DEFLATED instead of STORED")
    add_torch("no_data_pkl.bin", zip_with([(f"{prefix}/version", b"3\n")]), "data.pkl",
              "archive without data.pkl")
    add_torch("no_prefix.bin", zip_with([("data.pkl", b"\x80\x02}."), ("version", b"3\n")]),
              "top-level folder", "first entry has no folder")
    add_torch("torchscript.bin", zip_with([(f"{prefix}/data.pkl", b"\x80\x02}."),
                                           (f"{prefix}/constants.pkl", b"\x80\x02)."),
                                           (f"{prefix}/code/m.py", b"")]),
              "TorchScript", "a TorchScript archive")
    raw = open(good, "rb").read()
    add_torch("truncated_zip.bin", raw[: len(raw) // 2], "central directory",
              "zip cut in half: no end-of-central-directory record")
    add_torch("legacy.bin", open(os.path.join(ROOT, "torch", "legacy.bin"), "rb").read(),
              "legacy", "torch.save(_use_new_zipfile_serialization=False)")
    add_torch("legacy_tar.bin", open(os.path.join(ROOT, "torch", "legacy_tar.bin"), "rb").read(),
              "tar", "pre-0.4 tar archive")
    add_torch("preview.bin", b"PYTORCH1" + b"\x00" * 24, "PYTORCH1", "preview format")
    add_torch("not_a_checkpoint.bin", b"hello world, this is text\n", "not a torch checkpoint",
              "unknown magic")
    write_json(os.path.join(d, "catalogue.json"), cat)


def main() -> None:
    os.makedirs(ROOT, exist_ok=True)
    gen_safetensors()
    gen_torch()
    gen_hf()
    gen_convert()
    gen_offload()
    gen_bad()
    with open(os.path.join(ROOT, "VERSIONS.txt"), "w") as f:
        import accelerate
        import transformers
        import huggingface_hub
        f.write(f"torch {torch.__version__}\nsafetensors {safetensors.__version__}\n"
                f"transformers {transformers.__version__}\naccelerate {accelerate.__version__}\n"
                f"huggingface_hub {huggingface_hub.__version__}\npython {sys.version.split()[0]}\n")


if __name__ == "__main__":
    main()
