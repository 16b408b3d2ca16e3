#!/usr/bin/env python3
"""Draws docs/img/speedup_vs_peer.svg and docs/img/fraction_of_bound.svg from the summary table
at the top of docs/performance.md (between the summary:begin / summary:end markers), so the
plots always show the figures the table states.

    /opt/stowage-tools-venv/bin/python bench/plot_performance.py [--docs docs]

Rows whose "vs peer" is "NNx" go into the first plot; rows whose "vs bound" starts with "NN%"
into the second. Pending rows are listed under the plots as pending.
"""
import argparse
import pathlib
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_rows(perf_md: pathlib.Path):
    text = perf_md.read_text()
    begin = text.index("<!-- summary:begin")
    end = text.index("<!-- summary:end -->")
    rows = []
    for line in text[begin:end].splitlines():
        if not line.startswith("| ") or line.startswith("| ---") or line.startswith("| benchmark"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        name = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", cells[0]).replace("`", "")
        rows.append({"name": name, "vs_peer": cells[3], "vs_bound": cells[4]})
    return rows


def short(name: str) -> str:
    return name if len(name) <= 52 else name[:50] + "…"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", default=str(pathlib.Path(__file__).resolve().parent.parent / "docs"))
    args = ap.parse_args()
    docs = pathlib.Path(args.docs)
    rows = read_rows(docs / "performance.md")
    (docs / "img").mkdir(exist_ok=True)
    plt.rcParams["svg.hashsalt"] = "stowage"  # stable ids: the SVGs only change with the data
    plt.rcParams["font.size"] = 9

    speed = [(short(r["name"]), float(m.group(1))) for r in rows
             if (m := re.match(r"^([0-9.]+)x$", r["vs_peer"]))]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(speed) + 1.2))
    ax.barh([n for n, _ in speed][::-1], [v for _, v in speed][::-1], color="#3b6ea5")
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=0.8)
    for i, (_, v) in enumerate(speed[::-1]):
        ax.text(v * 1.05, i, f"{v:g}x", va="center")
    ax.set_xlabel("speed-up over the peer (same inputs, same machine, one run; log scale)")
    ax.set_title("stowage vs Accelerate / Transformers / bitsandbytes (2-vCPU VM, CPU only)")
    fig.tight_layout()
    fig.savefig(docs / "img" / "speedup_vs_peer.svg", metadata={"Date": None})
    plt.close(fig)

    bound = [(short(r["name"]), float(m.group(1))) for r in rows
             if (m := re.match(r"^([0-9.]+)%", r["vs_bound"]))]
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(bound) + 1.2))
    ax.barh([n for n, _ in bound][::-1], [v for _, v in bound][::-1], color="#6a9a3b")
    ax.axvline(100.0, color="black", linewidth=0.8)
    for i, (_, v) in enumerate(bound[::-1]):
        ax.text(v + 1, i, f"{v:g}%", va="center")
    ax.set_xlim(0, max(110, max(v for _, v in bound) + 15))
    ax.set_xlabel("achieved rate / physical bound measured in the same run (%)")
    ax.set_title("How close to the hardware (2-vCPU VM, CPU only; GPU figures pending)")
    fig.tight_layout()
    fig.savefig(docs / "img" / "fraction_of_bound.svg", metadata={"Date": None})
    plt.close(fig)

    pending = [r["name"] for r in rows if "pending" in r["vs_peer"] or "pending" in r["vs_bound"]]
    print(f"wrote {len(speed)} speed-ups and {len(bound)} bound fractions; pending: {pending}")


if __name__ == "__main__":
    main()
