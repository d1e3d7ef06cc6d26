"""Summary of a `run-security-bench.sh` log: per setting (plain, token, tls, tls+token) and
benchmark, the median over rounds of criterion's median estimate, and its ratio to plain."""

from __future__ import annotations

import re
import statistics
import sys
from collections import defaultdict

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}


def parse(text: str) -> dict[tuple[str, str], list[float]]:
    """(security, benchmark) -> criterion's median time of each run, in seconds."""
    runs: dict[tuple[str, str], list[float]] = defaultdict(list)
    security, name = None, None
    for line in text.splitlines():
        m = re.match(r"## round \d+ security (\S+)", line)
        if m:
            security = m.group(1)
            continue
        m = re.match(r"(ps_\S+)/(\S+)", line.strip())
        if m:
            name = m.group(2)
        m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", line)
        if m and security and name:
            runs[(security, name)].append(float(m.group(1)) * UNITS[m.group(2)])
            name = None
    return runs


def main(path: str) -> None:
    runs = parse(open(path, encoding="utf-8").read())
    names = sorted({n for _, n in runs})
    settings = ["plain", "token", "tls", "tls+token"]
    print("\n## summary: median over rounds (criterion medians); 64 MiB in GB/s, 100 B in µs; ratio to plain")
    print(f"{'benchmark':<18}" + "".join(f"{s:>22}" for s in settings))
    for n in names:
        cells = []
        base = statistics.median(runs[("plain", n)]) if runs.get(("plain", n)) else None
        for s in settings:
            v = runs.get((s, n))
            if not v:
                cells.append(f"{'-':>22}")
                continue
            t = statistics.median(v)
            shown = f"{64 * 2**20 / t / 1e9:.2f} GB/s" if "wire" in n else f"{t * 1e6:.1f} µs"
            ratio = f" ({base / t:.2f}x)" if base and "wire" in n else (f" ({t / base:.2f}x)" if base else "")
            cells.append(f"{shown + ratio + f' n={len(v)}':>22}")
        print(f"{n:<18}" + "".join(cells))


if __name__ == "__main__":
    main(sys.argv[1])
