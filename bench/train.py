"""Training benchmark: `homebake train` (LoRA) vs HF transformers + PEFT on the default model, in one run.

Both sides train LoRA (r 16, alpha 32, dropout 0.05, all 7 linear projections) on the same rows: the
demo data (examples/extract/train.jsonl) encoded with the model's chat template and packed into
``batch × seq_len`` rows by homebake's data pipeline, which the peer receives as ``input_ids``,
``position_ids`` (restarting per example, so transformers applies block-diagonal attention) and
``labels``. Same AdamW, constant learning rate 2e-4, clipping 1.0, same steps. Each configuration runs
in a fresh interpreter so its peak RSS is its own (whole process, model loading included).

The peer is measured in fp32 and with bf16 autocast, each with and without gradient checkpointing,
and its best tokens/s is the reference. tokens = non-padding input tokens processed; tokens/s counts
steps after ``--warmup``. Losses: the last training step's loss and the validation loss
(examples/extract/valid.jsonl) after the last step, both per trained token.

    .venv/bin/python bench/train.py                       # full run (~15-25 min on 2 cores)
    .venv/bin/python bench/train.py --steps 3 --warmup 1 --peer fp32   # smoke test
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import print_table, run_isolated  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAIN_DATA = ROOT / "examples" / "extract" / "train.jsonl"
VALID_DATA = ROOT / "examples" / "extract" / "valid.jsonl"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, alpha=32, dropout=0.05)
LR, CLIP, SEED = 2e-4, 1.0, 0


def _setup_torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _steady_tokens_per_s(step_tokens: list[int], step_seconds: list[float], warmup: int) -> float:
    tokens, seconds = sum(step_tokens[warmup:]), sum(step_seconds[warmup:])
    return tokens / seconds if seconds else float("nan")


def run_homebake(steps: int, warmup: int, batch_size: int, seq_len: int, threads: int, precision: str,
                 gradient_checkpointing: bool) -> dict:
    """The real `homebake train` code path (homebake.train.loop.train), timed from its metrics.jsonl."""
    _setup_torch(threads)
    from homebake.adapters.config import LoraConfig
    from homebake.data.config import DataConfig
    from homebake.train.config import TrainConfig
    from homebake.train.loop import train
    from homebake.train.metrics import read_metrics

    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            model=None, method="lora", out=out, precision=precision, device="cpu", progress=False,
            data=DataConfig(paths=[str(TRAIN_DATA)], validation=str(VALID_DATA), max_seq_len=seq_len, seed=SEED),
            lora=LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"], target_modules=TARGETS),
            batch_size=batch_size, max_steps=steps, learning_rate=LR, schedule="constant", warmup_steps=0,
            max_grad_norm=CLIP, seed=SEED, eval_every=0, save_every=10**9,
            gradient_checkpointing=gradient_checkpointing)
        result = train(config)
        records = [r for r in read_metrics(Path(out) / "metrics.jsonl") if "loss" in r]
    times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip([{"elapsed_s": 0.0}] + records, records)]
    return {"tokens_per_s": _steady_tokens_per_s([r["tokens"] for r in records], times, warmup),
            "peak_rss_gib": _peak_rss_gib(), "final_loss": records[-1]["loss"], "val_loss": result.val_loss,
            "losses": [r["loss"] for r in records], "tokens": sum(r["tokens"] for r in records)}


def _batches(batch_size: int, seq_len: int):
    """homebake's packed rows of the training data (same seed as the homebake run) and validation rows."""
    from homebake.data import DataConfig, prepare_dataset
    from homebake.model.load import load_tokenizer
    from homebake.train.data_stream import BatchStream, evaluation_batches

    tokenizer = load_tokenizer(None)
    data = prepare_dataset(DataConfig(paths=[str(TRAIN_DATA)], validation=str(VALID_DATA), max_seq_len=seq_len,
                                      seed=SEED), tokenizer)
    options = dict(batch_size=batch_size, max_seq_len=seq_len, pad_token_id=tokenizer.pad_token_id, packing=True)
    return BatchStream(data.train, seed=SEED, **options), evaluation_batches(data.validation, **options)


def run_peer(steps: int, warmup: int, batch_size: int, seq_len: int, threads: int, precision: str,
             gradient_checkpointing: bool) -> dict:
    """A plain PyTorch loop over transformers + PEFT (the documented way to train LoRA with them)."""
    torch = _setup_torch(threads)
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from homebake.default_model import default_model_path
    from homebake.train.loss import IGNORE_INDEX, shift_targets

    stream, eval_batches = _batches(batch_size, seq_len)
    gguf = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    model.config.use_cache = False
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    torch.manual_seed(SEED)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16"
                else torch.autocast("cpu", enabled=False))
    losses, step_tokens, step_seconds = [], [], []
    for _ in range(steps):
        batch = stream.next()
        started = time.perf_counter()
        with autocast:
            out = model(input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - started)
        step_tokens.append(batch.num_real_tokens)
        losses.append(float(out.loss))
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad(), autocast:
        for batch in eval_batches:
            logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids).logits.float()
            targets = shift_targets(batch.labels, batch.position_ids)
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                                             ignore_index=IGNORE_INDEX, reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    return {"tokens_per_s": _steady_tokens_per_s(step_tokens, step_seconds, warmup), "peak_rss_gib": _peak_rss_gib(),
            "final_loss": losses[-1], "val_loss": total / count, "losses": losses, "tokens": sum(step_tokens)}


PEER_CONFIGS = {"fp32": ("fp32", False), "fp32-gc": ("fp32", True), "bf16": ("bf16", False),
                "bf16-gc": ("bf16", True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="homebake's --precision (auto: bf16 only where native)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="homebake with checkpointing")
    parser.add_argument("--peer", default=",".join(PEER_CONFIGS), help="peer configurations to run")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 peers even without native bf16")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    common = dict(steps=args.steps, warmup=args.warmup, batch_size=args.batch_size, seq_len=args.seq_len,
                  threads=args.threads)
    print(f"load average before: {os.getloadavg()[0]:.2f} (the machine should be quiet)", flush=True)
    rows = []
    name = f"homebake {args.precision}" + (" + GC" if args.gradient_checkpointing else "")
    print(f"running {name} ...", flush=True)
    ours = run_isolated("train", "run_homebake", precision=args.precision,
                        gradient_checkpointing=args.gradient_checkpointing, **common)
    rows.append({"run": name, **ours})
    peers = []
    import torch

    from homebake.device import has_fast_bf16

    native_bf16 = has_fast_bf16("cpu")
    for key in [k for k in args.peer.split(",") if k]:
        precision, gc = PEER_CONFIGS[key]
        if precision == "bf16" and not native_bf16 and not args.force_bf16:
            print(f"skipping peer {key}: this CPU has no native bf16 (AVX512-BF16/AMX), where bf16 autocast runs "
                  "~30x slower than fp32, so it cannot be the peer's best (--force-bf16 runs it anyway)", flush=True)
            continue
        print(f"running peer {key} ...", flush=True)
        result = run_isolated("train", "run_peer", precision=precision, gradient_checkpointing=gc, **common)
        peers.append({"run": f"transformers+PEFT {key}", **result})
    rows += peers
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    table = [{"run": r["run"], "tokens/s": f"{r['tokens_per_s']:.0f}", "peak RSS GiB": f"{r['peak_rss_gib']:.2f}",
              f"loss @ step {args.steps}": f"{r['final_loss']:.4f}", "val loss": f"{r['val_loss']:.4f}"}
             for r in rows]
    print()
    print_table(table, list(table[0]))
    if peers:
        best = max(peers, key=lambda r: r["tokens_per_s"])
        speed = ours["tokens_per_s"] / best["tokens_per_s"]
        memory = ours["peak_rss_gib"] / best["peak_rss_gib"]
        loss_gap = abs(ours["final_loss"] - best["final_loss"]) / best["final_loss"]
        val_gap = abs(ours["val_loss"] - best["val_loss"]) / best["val_loss"]
        print(f"\nvs the peer's best ({best['run']}):")
        print(f"  tokens/s ratio   {speed:.2f}x   (target >= 2x)     {'met' if speed >= 2 else 'NOT met'}")
        print(f"  peak RSS ratio   {memory:.2f}x   (target <= 0.6x)   {'met' if memory <= 0.6 else 'NOT met'}")
        print(f"  final loss       {ours['final_loss']:.4f} vs {best['final_loss']:.4f} ({100 * loss_gap:.1f}% apart; "
              f"target <= 2%)   {'met' if loss_gap <= 0.02 else 'NOT met'}")
        print(f"  validation loss  {ours['val_loss']:.4f} vs {best['val_loss']:.4f} ({100 * val_gap:.1f}% apart)")
        for peer in peers:
            assert all(math.isfinite(x) for x in peer["losses"]), peer["run"]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
