#!/usr/bin/env python3
"""Time accelerate's infer_auto_device_map on a big meta model (for the side-by-side bench).

Builds the model of a bundled config on the meta device (no weights), computes the budgets
for the strategy, then times ``accelerate.utils.infer_auto_device_map`` alone, best of N runs
(wall clock, ``time.perf_counter``). Prints one JSON object:
``{"model": ..., "strategy": ..., "max_memory": {...}, "dtype": ..., "runs": N,
"seconds": best, "all_seconds": [...], "map_entries": n, "accelerate": version}``.

Usage: time_accelerate_plan.py [--config examples/configs/Llama-2-70b-hf/config.json]
       [--strategy balanced] [--max-memory '{"0": "20GB", "1": "20GB", "cpu": "100GB"}'] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dump_module_tree import build_meta_model_from_config  # noqa: E402


def parse_max_memory(text: str) -> dict:
    """JSON object → max_memory dict; numeric-string keys become int GPU indices."""
    return {int(k) if k.lstrip("-").isdigit() else k: v for k, v in json.loads(text).items()}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    import accelerate
    from accelerate.utils import get_balanced_memory, get_max_memory, infer_auto_device_map

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=os.path.join(root, "examples/configs/Llama-2-70b-hf/config.json"))
    p.add_argument("--strategy", default="balanced", choices=["sequential", "balanced", "balanced_low_0", "auto"])
    p.add_argument("--max-memory", default='{"0": "20GB", "1": "20GB", "cpu": "100GB"}')
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")

    model = build_meta_model_from_config(args.config, args.dtype)
    no_split = sorted(model._no_split_modules or [])
    mm = parse_max_memory(args.max_memory)
    if args.strategy == "sequential":
        budgets = get_max_memory(dict(mm))
    else:
        budgets = get_balanced_memory(model, dict(mm), no_split, dtype=args.dtype,
                                      low_zero=args.strategy == "balanced_low_0")
    times, device_map = [], None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        device_map = infer_auto_device_map(model, max_memory=dict(budgets), no_split_module_classes=no_split,
                                           dtype=args.dtype)
        times.append(time.perf_counter() - t0)
    name = os.path.basename(os.path.dirname(os.path.abspath(args.config)))
    print(json.dumps({"model": name, "strategy": args.strategy, "max_memory": json.loads(args.max_memory),
                      "dtype": args.dtype, "runs": args.repeat, "seconds": min(times), "all_seconds": times,
                      "map_entries": len(device_map), "accelerate": accelerate.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
