#!/usr/bin/env python3
"""Record the versions of the reference tools used to generate the fixtures.

Writes tests/fixtures/VERSIONS.json: Python, torch, transformers, accelerate, safetensors,
numpy, bitsandbytes (if importable) and the hash seed the generators ran with.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import os
import platform
import sys

PACKAGES = ["torch", "transformers", "accelerate", "safetensors", "numpy", "bitsandbytes", "huggingface_hub"]


def versions() -> dict:
    """Installed versions of the reference packages (None when absent)."""
    out = {"python": platform.python_version(), "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED")}
    for name in PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main() -> int:
    """Write tests/fixtures/VERSIONS.json."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "tests", "fixtures", "VERSIONS.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(versions(), fh, indent=2)
        fh.write("\n")
    print(f"wrote {os.path.relpath(path, root)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
