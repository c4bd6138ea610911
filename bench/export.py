"""Time and peak memory to export the default model (SmolLM2-135M, Q4_1 GGUF source) to GGUF Q8_0 and Q4_K_M.

    .venv/bin/python bench/export.py [--quants Q8_0 Q4_K_M] [--threads 2]

Each export runs `homebake export <default.gguf> --format gguf --quant Q` in its own process, so the peak
RSS is that export's own (load + dequantise the source, quantise, write). Also reports the file size and
the perplexity of the export on a short text next to the source's.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import Timer, peak_rss_gib, print_table, run_isolated  # noqa: E402

TEXT = ("The sun rises in the east and sets in the west. Water boils at one hundred degrees Celsius at sea "
        "level. Paris is the capital of France, and Rome is the capital of Italy. A week has seven days, and "
        "a year has twelve months. Cats and dogs are common pets in many homes around the world.")


def export_once(quant: str, out_dir: str, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    from homebake.cli import main
    from homebake.default_model import ensure_default_model

    source = ensure_default_model(quiet=True)
    out = os.path.join(out_dir, quant)
    with Timer() as timer:
        code = main(["export", str(source), "--format", "gguf", "--quant", quant, "--out", out, "--force"])
    assert code == 0
    (name,) = [f for f in os.listdir(out) if f.endswith(".gguf")]
    return {"quant": quant, "seconds": round(timer.seconds, 1), "peak_rss_gib": round(peak_rss_gib(), 2),
            "size_mib": round(os.path.getsize(os.path.join(out, name)) / 2**20, 1), "path": os.path.join(out, name)}


def perplexity_of(path: str | None) -> float:
    import math

    import torch

    from homebake.default_model import ensure_default_model
    from homebake.model.load import load_model

    loaded = load_model(path or str(ensure_default_model(quiet=True)))
    ids = loaded.tokenizer.encode(TEXT)
    with torch.no_grad():
        logits = loaded.model.logits(loaded.model(torch.tensor([ids])))[0]
    return round(math.exp(torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:])).item()), 3)


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quants", nargs="+", default=["Q8_0", "Q4_K_M"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rows = [{"quant": "source Q4_1", "perplexity": perplexity_of(None)}]
    with tempfile.TemporaryDirectory() as out_dir:
        for quant in args.quants:
            row = run_isolated("export", "export_once", quant=quant, out_dir=out_dir, threads=args.threads)
            row["perplexity"] = perplexity_of(row.pop("path"))
            rows.append(row)
    print_table(rows, ["quant", "seconds", "peak_rss_gib", "size_mib", "perplexity"])


if __name__ == "__main__":
    main()
