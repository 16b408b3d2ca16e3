"""Helpers shared by the side-by-side benchmark scripts in bench/: page-cache warming and running
a child process under /usr/bin/time -v for its JSON result and peak RSS."""
import json
import os
import re
import subprocess


def warm(path: str) -> int:
    """Reads every file in `path` once so the page cache holds it; returns the bytes read."""
    total = 0
    for f in sorted(os.listdir(path)):
        with open(os.path.join(path, f), "rb") as fh:
            while True:
                b = fh.read(1 << 24)
                if not b:
                    break
                total += len(b)
    return total


def timed(cmd: list[str]) -> tuple[dict, int]:
    """Runs cmd under /usr/bin/time -v; returns its last JSON stdout line and peak RSS (KiB)."""
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{p.stdout}\n{p.stderr[-4000:]}")
    line = [l for l in p.stdout.splitlines() if l.startswith("{")][-1]
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return json.loads(line), rss
