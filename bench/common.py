"""Helpers shared by the benchmarks: timing, peak RSS of a child process, result tables."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time


def peak_rss_gib() -> float:
    """Peak resident set size of this process so far, in GiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_isolated(module: str, function: str, **kwargs) -> dict:
    """Run ``module.function(**kwargs)`` in a fresh interpreter so peak memory is its own; returns its dict."""
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import {module} as m; "
            f"print('@@RESULT@@' + json.dumps(m.{function}(**json.loads(sys.argv[1]))))")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("@@RESULT@@"):
            return json.loads(line[len("@@RESULT@@"):])
    raise RuntimeError(f"{module}.{function} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


class Timer:
    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = [max(len(c), *(len(f"{r.get(c, '')}") for r in rows)) for c in columns]
    print(" | ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("-|-".join("-" * w for w in widths))
    for row in rows:
        print(" | ".join(f"{row.get(c, '')}".ljust(w) for c, w in zip(columns, widths)))
