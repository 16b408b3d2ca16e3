#!/usr/bin/env python3
"""Generate tests/fixtures/bnb/*.json with the REAL bitsandbytes (CPU backend) and torch.

Everything the C++ quantization tests compare against comes from here: NF4/FP4 packed bytes,
absmax, nested (double-quantized) statistics, quant maps, the QuantState JSON, dequantized
outputs in fp32/bf16/fp16, the 8-bit dynamic map, and LLM.int8 row-wise quantization plus the
mixed-precision (outlier-decomposed) matmul.

Which bitsandbytes paths run on a CPU-only machine (bitsandbytes 0.50.2):
  * quantize_4bit: no CPU kernel is registered -> the pure-torch "default" backend
    (bucketize on midpoints; all-zero block -> code 7; partial last block uses x / absmax).
  * dequantize_4bit: the native CPU kernel (odd shapes fall back to the default backend).
  * quantize_blockwise (nested absmax): the native CPU kernel, which is LUT-approximate.
    We also record the default backend's exact-nearest answer (redispatched to
    CompositeExplicitAutograd), which is what the CUDA kernel computes except at exact ties.
  * int8_vectorwise_quant / int8_mixed_scaled_mm / int8_mm_dequant: default backend.
Byte strings are base64 of the little-endian raw tensor bytes.

Run: /opt/stowage-tools-venv/bin/python tools/gen_bnb_fixtures.py
"""
import base64
import json
import logging
import os
import sys

logging.disable(logging.WARNING)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import bitsandbytes as bnb  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "bnb")
DEFAULT_KS = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def b64(t: torch.Tensor) -> str:
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return base64.b64encode(t.numpy().tobytes()).decode()


def f32bits(x: float) -> str:
    return "%08x" % int(np.array([x], dtype=np.float32).view(np.uint32)[0])


def weights(shape, seed, std=0.02, outlier_frac=0.005, outlier_scale=20.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * std
    mask = torch.rand(shape, generator=g) < outlier_frac
    return torch.where(mask, w * outlier_scale, w)


def quant4(x, quant_type, blocksize, nested, deq_dtypes):
    packed, st = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                 compress_statistics=nested)
    d = st.as_dict(packed=True)
    case = {
        "quant_type": quant_type, "blocksize": blocksize, "compress_statistics": nested,
        "input_dtype": str(x.dtype).replace("torch.", ""), "shape": list(x.shape),
        "input": b64(x), "packed": b64(packed), "packed_shape": list(packed.shape),
        "absmax": b64(d["absmax"]), "absmax_dtype": str(d["absmax"].dtype).replace("torch.", ""),
        "quant_map": b64(d["quant_map"]),
        "quant_state_json": bytes(d["quant_state.bitsandbytes__" + quant_type].tolist()).decode(),
        "dequantized": {},
    }
    if nested:
        case["nested_absmax"] = b64(d["nested_absmax"])
        case["nested_quant_map"] = b64(d["nested_quant_map"])
        case["offset_bits"] = f32bits(float(st.offset))
        # The un-nested absmax the nested statistics were computed from (same quantize_4bit).
        _, flat = F.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type,
                                  compress_statistics=False)
        case["absmax_f32"] = b64(flat.absmax)
        # Exact-nearest 8-bit codes (bnb default backend == CUDA rule up to exact ties).
        q_exact, am2 = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
            DEFAULT_KS, flat.absmax - st.offset, st.state2.code, 256)
        assert torch.equal(am2, st.state2.absmax)
        case["absmax_exact_nearest"] = b64(q_exact)
    for name in deq_dtypes:
        st.dtype = DTYPES[name]
        out = F.dequantize_4bit(packed, st)
        assert out.dtype == DTYPES[name]
        case["dequantized"][name] = b64(out)
    st.dtype = x.dtype
    return case


def gen_4bit():
    cases = []
    main = weights((40, 120), 1)
    big = weights((96, 200), 2)
    for qt in ("nf4", "fp4"):
        for bs in (64, 128, 256, 512, 1024, 2048, 4096):
            for nested in (False, True):
                deq = ("float32", "bfloat16", "float16") if bs == 64 else ("float32",) if bs in (256, 4096) else ()
                c = quant4(main, qt, bs, nested, deq)
                c["name"] = f"normal_outliers_{qt}_{bs}_{'nested' if nested else 'plain'}"
                cases.append(c)
        c = quant4(big, qt, 64, True, ("float32",))
        c["name"] = f"two_nested_blocks_{qt}"
        cases.append(c)
        for dt in ("bfloat16", "float16"):
            c = quant4(main.to(DTYPES[dt]), qt, 64, False, ("float32", dt))
            c["name"] = f"input_{dt}_{qt}"
            cases.append(c)

        # Edge cases (block size 64 unless stated).
        code = F.get_4bit_type(qt, device="cpu").float()
        sorted_code = torch.sort(code).values
        mids = (sorted_code[:-1] + sorted_code[1:]) / 2
        # Ties: s exactly equal to every midpoint, once with absmax 1 and once with absmax 2.
        ties = torch.zeros(128)
        ties[0] = 1.0
        ties[1:16] = mids
        ties[16:31] = -mids.abs() * torch.sign(mids)  # mirrored values as well
        ties[64] = -2.0
        ties[65:80] = 2 * mids
        ties[80:95] = torch.nextafter(2 * mids, torch.tensor(10.0))
        ties[95:110] = torch.nextafter(2 * mids, torch.tensor(-10.0))
        c = quant4(ties, qt, 64, False, ("float32",))
        c["name"] = f"ties_{qt}"
        cases.append(c)
        # All-zero middle block.
        z = weights((192,), 3)
        z[64:128] = 0
        c = quant4(z, qt, 64, False, ("float32", "bfloat16", "float16"))
        c["name"] = f"zero_block_{qt}"
        cases.append(c)
        # Odd lengths (partial last block, odd element count) at two block sizes.
        for n, bs in ((129, 64), (4097 + 64, 4096), (1, 64), (63, 64)):
            c = quant4(weights((n,), 4 + n), qt, bs, False, ("float32",))
            c["name"] = f"odd_{n}_{bs}_{qt}"
            cases.append(c)
        # Huge and tiny magnitudes (fp32 only: fp16 would overflow).
        h = torch.cat([weights((64,), 5) * 1e30, weights((64,), 6) * 1e-30,
                       weights((64,), 7) * 3e-38, torch.tensor([3.0e38, -1.0e-45] * 32)])
        c = quant4(h, qt, 64, False, ("float32", "bfloat16", "float16"))
        c["name"] = f"huge_tiny_{qt}"
        cases.append(c)
        # NaN inside a block (bnb CPU: absmax NaN for that block); recorded for documentation.
        nn_ = weights((128,), 8)
        nn_[70] = float("nan")
        c = quant4(nn_, qt, 64, False, ("float32",))
        c["name"] = f"nan_{qt}"
        cases.append(c)
    return cases


def gen_int8():
    cases = []
    for dt in ("float32", "bfloat16", "float16"):
        w = weights((48, 200), 10).to(DTYPES[dt])
        w[5] = 0  # all-zero row
        # Row 7: exact .5 ties after scaling (absmax 127 -> scale exactly 1).
        w[7] = torch.tensor([127.0, -127.0] + [k + 0.5 for k in range(-99, 99)])[:200].to(w.dtype)
        p = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False).to("cpu")
        cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
        assert torch.equal(p.data, cb) and torch.equal(p.SCB, scb)
        cases.append({"name": f"weight_{dt}", "dtype": dt, "shape": list(w.shape), "input": b64(w),
                      "CB": b64(cb), "SCB": b64(scb),
                      "dequantized": b64(F.int8_vectorwise_dequant(cb, scb))})
    # Mixed-precision matmul with outlier decomposition (threshold 6.0 and 3.0).
    w = weights((48, 200), 11, std=0.05)
    cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    bias = weights((48,), 12, std=0.1)
    mm = []
    for dt in ("float16", "float32", "bfloat16"):
        for m in (1, 3):
            for thr in (6.0, 3.0, 0.0):
                g = torch.Generator().manual_seed(20 + m)
                a = torch.randn((m, 200), generator=g)
                a[:, 17] *= 9.0
                a[0, 101] = 7.5
                a = a.to(DTYPES[dt])
                ca, sca, cols = F.int8_vectorwise_quant(a.to(torch.float16), threshold=thr)
                out, _ = torch.ops.bitsandbytes.int8_mixed_scaled_mm(
                    a, ca, cb, sca, scb, cols, bias.to(DTYPES[dt])) if cols is not None and \
                    cols.numel() else (torch.ops.bitsandbytes.int8_scaled_mm(
                        ca, cb, sca, scb, bias.to(DTYPES[dt]), DTYPES[dt]), None)
                acc = torch.ops.bitsandbytes.int8_linear_matmul(ca, cb)
                mm.append({"name": f"matmul_{dt}_m{m}_t{thr}", "dtype": dt, "threshold": thr,
                           "A": b64(a), "shape_A": list(a.shape), "CA": b64(ca), "SCA": b64(sca),
                           "outlier_cols": [] if cols is None else cols.tolist(),
                           "acc": b64(acc), "out": b64(out)})
    return {"cases": cases, "matmul": {"W": b64(w), "shape_W": list(w.shape), "CB": b64(cb),
                                       "SCB": b64(scb), "bias": b64(bias), "cases": mm}}


def main():
    os.makedirs(OUT, exist_ok=True)
    versions = {"bitsandbytes": bnb.__version__, "torch": torch.__version__,
                "python": sys.version.split()[0]}
    dyn = F.create_dynamic_map(signed=True)
    maps = {"versions": versions, "dynamic_map": b64(dyn),
            "dynamic_map_bits": ["%08x" % v for v in dyn.numpy().view(np.uint32)],
            "nf4": b64(F.get_4bit_type("nf4", device="cpu")),
            "fp4": b64(F.get_4bit_type("fp4", device="cpu"))}
    with open(os.path.join(OUT, "maps.json"), "w") as f:
        json.dump(maps, f, indent=1)
    with open(os.path.join(OUT, "quant4.json"), "w") as f:
        json.dump({"versions": versions, "cases": gen_4bit()}, f)
    with open(os.path.join(OUT, "int8.json"), "w") as f:
        json.dump({"versions": versions, **gen_int8()}, f)


if __name__ == "__main__":
    main()
