"""Generation speed of the default model: homebake vs transformers, in one run, each side in its own process.

    .venv/bin/python bench/generate.py [--new-tokens 64] [--threads 2] [--workload all|single|eval]
                                       [--adapter RUN] [--eval-batch 16] [--eval-examples N]

single: one chat prompt, greedy with a KV cache in fp32, exactly --new-tokens tokens (end tokens ignored) so the
work is identical; load time and peak RSS.

eval: the demo's held-out prompts (examples/extract/test.jsonl, rendered with the model's chat template, the
same token ids on both sides) answered greedily as `homebake eval` answers them: the same answer budget
(longest reference + 16 tokens), stopping at the model's end tokens, prompts sorted by length and decoded in
the same chunks of at most --eval-batch. homebake runs its own eval path (`greedy_answers`, the dtype
`inference_placement` picks); transformers runs batched `generate` (left padding, greedy) in fp32 and bf16, and
its faster dtype is the peer's result (bf16 is emulated on CPUs without AVX512-BF16/AMX: there it is measured on
the first chunk only, which is enough to see it lose). With --adapter (a training run or PEFT adapter) both
sides answer with the fine-tuned weights merged (transformers through PEFT's merge_and_unload). Prints useful
tokens/s (answer tokens, the end token not counted), answers/s, the ratio and how many answers are identical.
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


EVAL_DATA = os.path.join(os.path.dirname(__file__), "..", "examples", "extract", "test.jsonl")


def eval_prompts(examples: int | None) -> dict:
    """The demo's held-out prompts as homebake eval encodes them, its answer budget, references and end ids."""
    from homebake.evaluate import EvalOptions, answer_budget, answered_examples, load_eval_data, prompt_ids
    from homebake.model.load import load_model

    tokenizer, options = load_model(None).tokenizer, EvalOptions(max_examples=examples)
    examples = answered_examples(load_eval_data(EVAL_DATA, tokenizer, options), options)
    return {"prompts": [prompt_ids(tokenizer, e) for e in examples], "references": [e.reference for e in examples],
            "budget": answer_budget(examples, tokenizer, options), "stop_ids": sorted(tokenizer.end_token_ids),
            "pad_token_id": tokenizer.pad_token_id}


def homebake_eval_side(threads: int, adapter: str | None, batch: int, examples: int | None) -> dict:
    """`homebake eval`'s answering step (greedy_answers, on the model as `open_for_inference` places it), timed."""
    _setup(threads)
    from homebake.evaluate import EvalOptions, answer_budget, answered_examples, greedy_answers, load_eval_data
    from homebake.sources import open_for_inference

    loaded = open_for_inference(None, adapter)
    tokenizer, options = loaded.tokenizer, EvalOptions(generation_batch=batch, max_examples=examples)
    examples = answered_examples(load_eval_data(EVAL_DATA, tokenizer, options), options)
    budget = answer_budget(examples, tokenizer, options)
    greedy_answers(loaded.model, tokenizer, examples[:2], 4, batch_size=batch)  # warm-up
    with Timer() as gen:
        answers = greedy_answers(loaded.model, tokenizer, examples, budget, batch_size=batch)
    return {"dtype": str(next(loaded.model.parameters()).dtype).removeprefix("torch."), "gen_s": gen.seconds,
            "tokens": sum(a.tokens for a in answers), "answers": [a.text for a in answers], "n": len(answers)}


def transformers_eval_side(threads: int, adapter: str | None, batch: int, dtype: str, spec: dict,
                           max_chunks: int | None = None) -> dict:
    """transformers' batched greedy `generate` on the same prompt ids, chunks and budget."""
    torch, path = _setup(threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from homebake.generate import length_chunks  # homebake eval's chunks, so both sides decode the same batches

    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    if adapter:
        from peft import PeftModel

        model.hf_quantizer.remove_quantization_config(model)  # PEFT refuses a model marked GGUF-quantised
        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()  # merged in fp32, as homebake
    model = model.to(torch_dtype).eval()
    prompts, budget, stop, pad = spec["prompts"], spec["budget"], spec["stop_ids"], spec["pad_token_id"]

    def answer(rows: list[list[int]], new_tokens: int) -> list[list[int]]:
        width = max(len(r) for r in rows)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             eos_token_id=stop, pad_token_id=pad)[:, width:].tolist()
        cut = []
        for row in out:  # the answer ends before its first end token (later positions are padding)
            end = next((i for i, t in enumerate(row) if t in stop), len(row))
            cut.append(row[:end])
        return cut

    chunks = length_chunks([len(p) for p in prompts], batch)[:max_chunks]
    answers: list = [None] * len(prompts)
    with torch.inference_mode():
        answer(prompts[:2], 4)  # warm-up
        with Timer() as gen:
            for chunk in chunks:
                for index, ids in zip(chunk, answer([prompts[i] for i in chunk], budget)):
                    answers[index] = ids
    done = [i for chunk in chunks for i in chunk]
    texts = [tokenizer.decode(answers[i], skip_special_tokens=True).strip() if answers[i] is not None else None
             for i in range(len(prompts))]
    return {"dtype": dtype, "gen_s": gen.seconds, "tokens": sum(len(answers[i]) for i in done),
            "answers": texts, "n": len(done)}


def eval_workload(threads: int, adapter: str | None, batch: int, examples: int | None = None) -> None:
    from homebake.device import has_fast_bf16

    spec = run_isolated("generate", "eval_prompts", examples=examples)
    native = has_fast_bf16("cpu")
    peers = {}
    for dtype in ("fp32", "bf16"):
        limit = None if dtype == "fp32" or native else 1  # emulated bf16: one chunk shows it
        peers[dtype] = run_isolated("generate", "transformers_eval_side", threads=threads, adapter=adapter,
                                    batch=batch, dtype=dtype, spec=spec, max_chunks=limit)
    hb = run_isolated("generate", "homebake_eval_side", threads=threads, adapter=adapter, batch=batch,
                      examples=examples)
    rows = []
    for name, r in [("transformers " + d, p) for d, p in peers.items()] + [("homebake " + hb["dtype"], hb)]:
        rows.append({"side": name, "answers": r["n"], "s": f"{r['gen_s']:.1f}", "tokens": r["tokens"],
                     "tokens/s": f"{r['tokens'] / r['gen_s']:.1f}", "answers/s": f"{r['n'] / r['gen_s']:.2f}"})
    print(f"\neval throughput: {len(spec['prompts'])} held-out prompts of {EVAL_DATA.split('/../')[-1]}, "
          f"budget {spec['budget']} tokens, chunks of <= {batch}, {threads} threads, "
          f"{'fine-tuned ' + adapter if adapter else 'base model'}; bf16 {'native' if native else 'emulated'}")
    print_table(rows, ["side", "answers", "s", "tokens", "tokens/s", "answers/s"])
    best = max((p for p in peers.values() if p["n"] == len(spec["prompts"])) or peers.values(),
               key=lambda p: p["tokens"] / p["gen_s"])
    # the peer's best: its fastest dtype among those that answered every prompt
    speed = (hb["tokens"] / hb["gen_s"]) / (best["tokens"] / best["gen_s"])
    answer_speed = (hb["n"] / hb["gen_s"]) / (best["n"] / best["gen_s"])
    same = sum(a == b for a, b in zip(hb["answers"], best["answers"]))

    def exact(answers: list) -> int:
        return sum(a is not None and a == r.strip() for a, r in zip(answers, spec["references"]))

    print(f"ratio (homebake / transformers {best['dtype']}): tokens/s x{speed:.2f}, answers/s x{answer_speed:.2f}")
    print(f"identical greedy answers: {same}/{len(spec['prompts'])}; exact match homebake {exact(hb['answers'])}, "
          f"transformers {exact(best['answers'])} of {len(spec['prompts'])}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workload", choices=("all", "single", "eval"), default="all")
    parser.add_argument("--adapter", default=None, help="eval workload: answer with this run/adapter merged in")
    parser.add_argument("--eval-batch", type=int, default=16, help="eval workload: prompts decoded together "
                        "(homebake eval's default)")
    parser.add_argument("--eval-examples", type=int, default=None, help="eval workload: only the first N held-out "
                        "examples (a quick check; the default is all 50, as the demo)")
    opts = parser.parse_args()
    if opts.workload != "single":
        eval_workload(opts.threads, opts.adapter, opts.eval_batch, opts.eval_examples)
        if opts.workload == "eval":
            return
        print()
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
