#!/usr/bin/env python3
"""Side by side, in one run: stowage's quantization kernels (bench/quant_bench, Google Benchmark)
and bitsandbytes' CPU path on the same 4096x4096 weight, plus the machine's memory bandwidth
(measured by quant_bench in the same run).

Usage: /opt/stowage-tools-venv/bin/python bench/quant_side_by_side.py BUILD_DIR/bench/quant_bench
"""
import json
import logging
import subprocess
import sys
import time

logging.disable(logging.WARNING)
import torch  # noqa: E402
import bitsandbytes.functional as F  # noqa: E402

N = K = 4096


def best_of(fn, reps=5):
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    exe = sys.argv[1]
    out = subprocess.run([exe, "--benchmark_format=json", "--benchmark_min_time=0.5"],
                         check=True, capture_output=True, text=True).stdout
    ours = {b["name"].replace("/real_time", ""): b for b in json.loads(out)["benchmarks"]}

    torch.manual_seed(1)
    w32 = torch.randn(N, K) * 0.02
    w16 = w32.to(torch.bfloat16)
    bnb = {}
    bnb["quantize_nf4_fp32"] = best_of(lambda: F.quantize_4bit(w32, blocksize=64, quant_type="nf4"))
    bnb["quantize_nf4_bf16"] = best_of(lambda: F.quantize_4bit(w16, blocksize=64, quant_type="nf4"))
    q, st = F.quantize_4bit(w32, blocksize=64, quant_type="nf4", compress_statistics=False)
    st.dtype = torch.float32
    bnb["dequantize_nf4/0"] = best_of(lambda: F.dequantize_4bit(q, st))
    st.dtype = torch.bfloat16
    bnb["dequantize_nf4/1"] = best_of(lambda: F.dequantize_4bit(q, st))
    bnb["quantize_int8_fp16_path"] = best_of(lambda: F.int8_vectorwise_quant(w16.to(torch.float16)))
    x32 = torch.randn(1, K)
    bnb["torch_matvec_fp32"] = best_of(lambda: x32 @ w32.T)
    x16 = x32.to(torch.bfloat16)
    bnb["torch_matvec_bf16"] = best_of(lambda: x16 @ w16.T)

    def ms(name):
        b = ours["BM_" + name]
        scale = {"ms": 1e-3, "us": 1e-6, "ns": 1e-9}[b["time_unit"]]
        return b["real_time"] * scale * 1e3

    bw = ours["BM_memory_read"]["bytes_per_second"] / 1e9
    print(f"threads: torch {torch.get_num_threads()}; memory read bandwidth {bw:.1f} GB/s, "
          f"memcpy (read+write) {ours['BM_memcpy']['bytes_per_second'] / 1e9:.1f} GB/s")
    print("| operation (4096x4096) | stowage ms | bitsandbytes CPU ms | speed-up | stowage GB/s | % of read bw |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ["quantize_nf4_fp32", "quantize_nf4_bf16", "dequantize_nf4/0", "dequantize_nf4/1",
                 "quantize_int8_fp16_path"]:
        s = ms(name)
        b = bnb[name] * 1e3
        gbs = ours["BM_" + name]["bytes_per_second"] / 1e9
        print(f"| {name} | {s:.2f} | {b:.2f} | {b / s:.1f}x | {gbs:.2f} | {100 * gbs / bw:.0f}% |")
    print("| matvec (M=1) | stowage ms | torch ms | | | |")
    for name in ["matvec_nf4/1", "matvec_nf4/4", "matvec_int8", "matvec_bf16", "matvec_fp32"]:
        print(f"| {name} | {ms(name):.3f} | | | | |")
    print(f"| torch x@W.T fp32 | | {bnb['torch_matvec_fp32'] * 1e3:.3f} | | | |")
    print(f"| torch x@W.T bf16 | | {bnb['torch_matvec_bf16'] * 1e3:.3f} | | | |")


if __name__ == "__main__":
    main()
