"""Disk offload, stowage vs accelerate, side by side in one run on one machine, cold page cache.

    /opt/stowage-tools-venv/bin/python bench/offload_side_by_side.py \
        --generate build-gen/examples/generate/stowage-generate

1. Makes (once) a ~870 MB float32 Llama with transformers (random init, one safetensors file)
   in /tmp/stowage-offload-bench (never committed).
2. Measures, each with every weight file evicted from the page cache first
   (posix_fadvise(POSIX_FADV_DONTNEED) on every file, see evict()):
     - sequential read: the checkpoint's bytes read front to back in 16 MiB reads, buffered and
       with O_DIRECT (the floor is the faster of the two);
     - stowage: stowage-generate with the device map {"": "disk"} (weights served straight from
       the checkpoint, blocks prefetched, --blocks-in-flight in flight, default 3), one forward over the prompt
       ("prefill" line);
     - accelerate: disk_offload(model, folder, execution_device="cpu") (its offload folder is
       written once beforehand, then evicted), one forward over the same prompt.
   Same prompt (16 tokens), same threads (2). Each measurement runs --repeat times (default 3,
   each cold); the best is reported, all of them in the JSON.
3. Prints a Markdown table and a JSON summary (targets: stowage >= 5x faster than accelerate and
   within 1.3x of the cold sequential read).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

MODEL = "/tmp/stowage-offload-bench"
PROMPT = [1, 450, 4996, 17354, 1701, 432, 17204, 975, 278, 17366, 11203, 29889, 13, 1576, 338, 263]


def make_model(path: str) -> None:
    if os.path.exists(os.path.join(path, "model.safetensors")):
        return
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                   num_hidden_layers=12, num_attention_heads=16, num_key_value_heads=4,
                                   tie_word_embeddings=False, torch_dtype="float32")
    model = transformers.LlamaForCausalLM(cfg)
    model.save_pretrained(path, max_shard_size="4GB")


def evict(paths: list[str]) -> None:
    """Drops the files' pages from the page cache (clean pages only: they were never written
    through a mapping), so the next read comes from the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd) if os.access(p, os.W_OK) else None
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def files_under(path: str) -> list[str]:
    out = []
    for root, _, names in os.walk(path):
        out += [os.path.join(root, n) for n in names]
    return out


def sequential_read(paths: list[str]) -> tuple[float, int]:
    evict(paths)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while True:
                b = f.read(16 << 20)
                if not b:
                    break
                total += len(b)
    return time.perf_counter() - t0, total


def sequential_read_direct(paths: list[str]) -> tuple[float, int]:
    """The same bytes front to back with O_DIRECT (16 MiB reads into one page-aligned buffer,
    no page cache): on this VM's virtual disk faster than buffered reads, so the floor is the
    faster of the two."""
    import mmap
    evict(paths)
    buf = mmap.mmap(-1, 16 << 20)
    total = 0
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_RDONLY | os.O_DIRECT)
        try:
            off = 0
            while True:
                n = os.preadv(fd, [buf], off)
                if n <= 0:
                    break
                total += n
                off += n
                if n < len(buf):
                    break
        finally:
            os.close(fd)
    return time.perf_counter() - t0, total


def run_stowage(generate: str, tmp: str, in_flight: int, disk_io: str) -> dict:
    map_path = os.path.join(tmp, "all_disk.json")
    with open(map_path, "w") as f:
        f.write('{"": "disk"}')
    evict(files_under(MODEL))
    cmd = [generate, MODEL, "--prompt-ids", ",".join(map(str, PROMPT)), "--max-new-tokens", "1",
           "--device-map", map_path, "--offload-folder", os.path.join(tmp, "stowage-offload"),
           "--threads", "2", "--ignore-eos", "--blocks-in-flight", str(in_flight),
           "--disk-io", disk_io]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    m = re.search(r"prefill\s+\d+ tokens in ([0-9.]+) s", out)
    load = re.search(r"load\s+([0-9.]+) s", out)
    fetch = re.search(r"prefetch\s+(.*)", out)
    return {"forward_s": float(m.group(1)), "load_s": float(load.group(1)),
            "prefetch": fetch.group(1) if fetch else "", "stdout": out}


def run_accelerate(tmp: str) -> dict:
    code = f"""
import json, os, time, torch, transformers
from accelerate import disk_offload
torch.set_num_threads(2)
model = transformers.LlamaForCausalLM.from_pretrained({MODEL!r}, dtype=torch.float32)
model.eval()
folder = {os.path.join(tmp, 'accelerate-offload')!r}
t0 = time.perf_counter()
disk_offload(model, folder, execution_device="cpu")
setup = time.perf_counter() - t0
for root, _, names in os.walk(folder):
    for n in names:
        fd = os.open(os.path.join(root, n), os.O_RDONLY)
        os.fsync(fd)  # just written: dirty pages are not dropped by DONTNEED
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
ids = torch.tensor([{PROMPT!r}])
with torch.no_grad():
    t0 = time.perf_counter()
    model(ids)
    fwd = time.perf_counter() - t0
print(json.dumps({{"forward_s": fwd, "disk_offload_setup_s": setup}}))
"""
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generate", required=True)
    ap.add_argument("--blocks-in-flight", type=int, default=3,
                    help="offload_options::blocks_in_flight (the library default is 3)")
    ap.add_argument("--repeat", type=int, default=3,
                    help="runs of each measurement, each from a cold page cache; the best is kept")
    ap.add_argument("--disk-io", default="auto,direct,buffered",
                    help="stowage-generate --disk-io modes to measure, comma-separated (auto is "
                         "the library default: O_DIRECT only when the disk blocks exceed half "
                         "of the available RAM)")
    args = ap.parse_args()
    modes = args.disk_io.split(",")
    make_model(MODEL)
    weights = [p for p in files_under(MODEL) if p.endswith(".safetensors")]
    load_avg = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="stowage-offload-bench-") as tmp:
        reads = [sequential_read(weights) for _ in range(args.repeat)]
        direct_reads = [sequential_read_direct(weights) for _ in range(args.repeat)]
        assert all(r[1] == reads[0][1] for r in reads + direct_reads)
        seq_s, nbytes = min(reads + direct_reads)
        runs = {m: [run_stowage(args.generate, tmp, args.blocks_in_flight, m)
                    for _ in range(args.repeat)] for m in modes}
        best = {m: min(r, key=lambda x: x["forward_s"]) for m, r in runs.items()}
        st = best[modes[0]]
        accs = [run_accelerate(tmp) for _ in range(args.repeat)]
        acc = min(accs, key=lambda r: r["forward_s"])
    res = {
        "weight_bytes": nbytes,
        "sequential_read_s": seq_s,
        "sequential_read_MBps": nbytes / seq_s / 1e6,
        "stowage_forward_s": st["forward_s"],
        "stowage_prefetch": st["prefetch"],
        "stowage_by_disk_io": {m: {"forward_s": b["forward_s"], "prefetch": b["prefetch"],
                                   "all_forward_s": [r["forward_s"] for r in runs[m]],
                                   "over_sequential_read": b["forward_s"] / seq_s}
                               for m, b in best.items()},
        "blocks_in_flight": args.blocks_in_flight,
        "repeat": args.repeat,
        "all_sequential_read_s": [r[0] for r in reads],
        "all_sequential_read_direct_s": [r[0] for r in direct_reads],
        "all_stowage_forward_s": [r["forward_s"] for r in runs[modes[0]]],
        "all_accelerate_forward_s": [r["forward_s"] for r in accs],
        "accelerate_forward_s": acc["forward_s"],
        "accelerate_disk_offload_setup_s": acc["disk_offload_setup_s"],
        "speedup_vs_accelerate": acc["forward_s"] / st["forward_s"],
        "stowage_over_sequential_read": st["forward_s"] / seq_s,
        "load_average_before": load_avg,
        "load_average_after": os.getloadavg(),
    }
    print("| cold page cache, all blocks on disk | seconds | MB/s of weights |")
    print("| --- | ---: | ---: |")
    print(f"| sequential read of the weights, buffered | {min(reads)[0]:.3f} | "
          f"{nbytes / min(reads)[0] / 1e6:.0f} |")
    print(f"| sequential read of the weights, O_DIRECT | {min(direct_reads)[0]:.3f} | "
          f"{nbytes / min(direct_reads)[0] / 1e6:.0f} |")
    for m, b in best.items():
        kind = re.search(r"(direct|buffered|mapped) reads", b["prefetch"])
        print(f"| stowage forward (prefetch, {args.blocks_in_flight} in flight, --disk-io {m}: "
              f"{kind.group(0) if kind else '?'}) | {b['forward_s']:.3f} | "
              f"{nbytes / b['forward_s'] / 1e6:.0f} |")
    print(f"| accelerate disk_offload forward | {acc['forward_s']:.3f} | "
          f"{nbytes / acc['forward_s'] / 1e6:.0f} |")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
