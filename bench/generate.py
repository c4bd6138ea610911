"""Generation speed and load time of the default model: homebake vs transformers, same prompt, one run.

    .venv/bin/python bench/generate.py [--new-tokens 64] [--threads 2]

Both sides run greedy decoding with a KV cache in fp32 on the CPU and produce exactly --new-tokens tokens
(end tokens ignored) so the work is identical. Each side runs in its own process.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
from common import Timer, peak_rss_gib, print_table, run_isolated  # noqa: E402

PROMPT = "Write a short story about a robot who learns to bake bread."


def _setup(threads: int):
    import torch

    torch.set_num_threads(threads)
    from homebake.default_model import ensure_default_model

    return torch, ensure_default_model(quiet=True)


def homebake_side(new_tokens: int, threads: int) -> dict:
    torch, path = _setup(threads)
    from homebake.generate import SamplingConfig, generate_ids
    from homebake.model.load import load_model

    with Timer() as load:
        loaded = load_model(str(path))
    ids = loaded.tokenizer.encode_chat([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    config = SamplingConfig(temperature=0, max_new_tokens=new_tokens)
    list(generate_ids(loaded.model, ids, SamplingConfig(temperature=0, max_new_tokens=4)))  # warm-up
    with Timer() as gen:
        out = list(generate_ids(loaded.model, ids, config))
    return {"load_s": load.seconds, "tokens": len(out), "gen_s": gen.seconds, "rss_gib": peak_rss_gib(),
            "ids": out}


def transformers_side(new_tokens: int, threads: int) -> dict:
    torch, path = _setup(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with Timer() as load:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model.eval()
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)["input_ids"]
    # An explicit all-ones mask: the prompt contains <|im_end|>, which is also this model's pad id, and
    # transformers would otherwise infer those positions to be padding.
    kwargs = dict(do_sample=False, eos_token_id=None, pad_token_id=tokenizer.eos_token_id,
                  attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, min_new_tokens=4, **kwargs)  # warm-up
        with Timer() as gen:
            out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kwargs)
    new = out[0, ids.shape[1]:].tolist()
    return {"load_s": load.seconds, "tokens": len(new), "gen_s": gen.seconds, "rss_gib": peak_rss_gib(),
            "ids": new}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    opts = parser.parse_args()
    results = {}
    for name, function in (("transformers", "transformers_side"), ("homebake", "homebake_side")):
        results[name] = run_isolated("generate", function, new_tokens=opts.new_tokens, threads=opts.threads)
    rows = []
    for name, r in results.items():
        rows.append({"side": name, "load s": f"{r['load_s']:.2f}", "tokens/s": f"{r['tokens'] / r['gen_s']:.1f}",
                     "peak RSS GiB": f"{r['rss_gib']:.2f}"})
    print_table(rows, ["side", "load s", "tokens/s", "peak RSS GiB"])
    hb, tf = results["homebake"], results["transformers"]
    speed = (hb["tokens"] / hb["gen_s"]) / (tf["tokens"] / tf["gen_s"])
    agree = sum(a == b for a, b in zip(hb["ids"], tf["ids"]))
    print(f"\nratios (homebake / transformers): generation tokens/s x{speed:.2f}, "
          f"load time x{hb['load_s'] / tf['load_s']:.2f}, peak RSS x{hb['rss_gib'] / tf['rss_gib']:.2f}")
    print(f"greedy tokens identical: {agree}/{min(len(hb['ids']), len(tf['ids']))} positions")


if __name__ == "__main__":
    main()
