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

A second workload packs the same data into ``--long-seq-len`` (2048) token rows with the same tokens per step
(batch × seq_len / 2048 rows): attention whose cost follows the examples keeps our tokens/s, a dense
block-diagonal mask does not. The run also measures bf16 and fp32 matmul GFLOP/s and prints our share of that
roofline (the necessary FLOPs per token are counted from the model shapes and the batches).

    .venv/bin/python bench/train.py                       # full run (both workloads, every peer: long)
    .venv/bin/python bench/train.py --steps 12 --warmup 2 --peer bf16,fp32   # what docs/train.md reports
    .venv/bin/python bench/train.py --steps 3 --warmup 1 --peer fp32 --long-seq-len 0   # smoke test
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
TARGETS_BY_CLASS = {True: 2.2, False: 1.4}  # 256-token rows: native bf16 CPU / AVX2-only CPU
LONG_ROW_TARGET, LONG_ROW_KEEP, MEMORY_TARGET, LOSS_TARGET = 4.0, 0.85, 0.5, 0.02


def measure_matmul(threads: int, dtypes: list[str], size: int = 2048, reps: int = 6) -> dict:
    """GFLOP/s of a size^3 matmul per dtype on this machine (the roofline of the step's matmuls)."""
    torch = _setup_torch(threads)
    result = {}
    for name in dtypes:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[name]
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        for _ in range(2):
            a @ b
        best = float("inf")
        for _ in range(reps):
            started = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - started)
        result[name] = 2 * size ** 3 / best / 1e9
    return result


def step_flops(batch_size: int, seq_len: int, steps: int, r: int) -> float:
    """Necessary FLOPs per real token of our step, averaged over the benchmark's batches.

    Frozen linear layers: forward + input gradient, 4 x params per token (the frozen weights need no weight
    gradient); LoRA: 6 r (in + out) per token and projection; LM head at trained positions only (4 x V x H);
    attention within each example: 12 x H x head_dim per causal (query, key) pair (forward 4, backward 8).
    """
    from homebake.default_model import default_model_path
    from homebake.model.args import ModelArgs
    from homebake.model.gguf_file import read_gguf_metadata
    from homebake.train.loss import shift_targets

    args = ModelArgs.from_gguf_metadata(read_gguf_metadata(default_model_path()))
    hidden, inter, heads, kv, dim = (args.hidden_size, args.intermediate_size, args.num_attention_heads,
                                     args.num_key_value_heads, args.head_dim)
    shapes = [(hidden, heads * dim), (hidden, kv * dim), (hidden, kv * dim), (heads * dim, hidden),
              (hidden, inter), (hidden, inter), (inter, hidden)]
    linear = sum(i * o for i, o in shapes) * args.num_hidden_layers
    lora = sum(r * (i + o) for i, o in shapes) * args.num_hidden_layers
    stream, _ = _batches(batch_size, seq_len)
    total_tokens, total = 0, 0.0
    for _ in range(steps):
        batch = stream.next()
        tokens = batch.input_ids.numel()
        trained = int((shift_targets(batch.labels, batch.position_ids) != -100).sum())
        starts = (batch.position_ids == 0).clone()
        starts[:, 0] = True
        pairs = 0
        for row in range(starts.shape[0]):
            bounds = starts[row].nonzero().flatten().tolist() + [starts.shape[1]]
            pairs += sum((b - a) * (b - a + 1) // 2 for a, b in zip(bounds[:-1], bounds[1:]))
        total += (4 * linear + 6 * lora) * tokens + 4 * args.vocab_size * hidden * trained \
            + 12 * heads * dim * pairs * args.num_hidden_layers
        total_tokens += batch.num_real_tokens
    return total / total_tokens


def run_workload(args, seq_len: int, batch_size: int, native_bf16: bool) -> dict:
    common = dict(steps=args.steps, warmup=args.warmup, batch_size=batch_size, seq_len=seq_len, threads=args.threads)
    rows = []
    name = f"homebake {args.precision}" + (" + GC" if args.gradient_checkpointing else "")
    print(f"[{batch_size} x {seq_len}] running {name} ...", flush=True)
    ours = run_isolated("train", "run_homebake", precision=args.precision,
                        gradient_checkpointing=args.gradient_checkpointing, **common)
    rows.append({"run": name, **ours})
    peers = []
    for key in [k for k in args.peer.split(",") if k]:
        precision, gc = PEER_CONFIGS[key]
        if precision == "bf16" and not native_bf16 and not args.force_bf16:
            print(f"skipping peer {key}: this CPU has no native bf16 (AVX512-BF16/AMX), where bf16 autocast runs "
                  "~30x slower than fp32, so it cannot be the peer's best (--force-bf16 runs it anyway)", flush=True)
            continue
        print(f"[{batch_size} x {seq_len}] running peer {key} ...", flush=True)
        result = run_isolated("train", "run_peer", precision=precision, gradient_checkpointing=gc, **common)
        peers.append({"run": f"transformers+PEFT {key}", **result})
    rows += peers
    for peer in peers:
        assert all(math.isfinite(x) for x in peer["losses"]), peer["run"]
    return {"seq_len": seq_len, "batch_size": batch_size, "ours": ours, "peers": peers, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of tokens/s")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--long-seq-len", type=int, default=2048,
                        help="second workload: the same data packed into rows this long, same tokens per step "
                             "(0 skips it)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", default="auto", help="homebake's --precision (auto: bf16 only where native)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="homebake with checkpointing")
    parser.add_argument("--peer", default=",".join(PEER_CONFIGS), help="peer configurations to run")
    parser.add_argument("--force-bf16", action="store_true", help="run bf16 peers even without native bf16")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    from homebake.device import has_fast_bf16

    native_bf16 = has_fast_bf16("cpu")
    cpu_class = "native bf16 (AVX512-BF16/AMX)" if native_bf16 else "no native bf16 (AVX2-only class)"
    print(f"CPU: {_cpu_name()}, {cpu_class}; {args.threads} threads", flush=True)
    print(f"load average before: {os.getloadavg()[0]:.2f} (the machine should be quiet)", flush=True)
    # bf16 without native support is emulated: a 2048^3 matmul then takes minutes and no run of ours uses it
    dtypes = ["bf16", "fp32"] if native_bf16 or args.force_bf16 or args.precision == "bf16" else ["fp32"]
    roofline = run_isolated("train", "measure_matmul", threads=args.threads, dtypes=dtypes)
    print("matmul 2048^3: " + ", ".join(f"{name} {gflops:.0f} GFLOP/s" for name, gflops in roofline.items()), flush=True)
    workloads = [run_workload(args, args.seq_len, args.batch_size, native_bf16)]
    tokens_per_step = args.batch_size * args.seq_len
    if args.long_seq_len and args.long_seq_len != args.seq_len:
        long_batch = max(1, tokens_per_step // args.long_seq_len)
        workloads.append(run_workload(args, args.long_seq_len, long_batch, native_bf16))
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    ours_dtype = "bf16" if (args.precision == "bf16" or (args.precision == "auto" and native_bf16)) else "fp32"
    speed_target = TARGETS_BY_CLASS[native_bf16]
    summary = []
    for work in workloads:
        flops = step_flops(work["batch_size"], work["seq_len"], args.steps, LORA["r"])
        roof_tokens = roofline[ours_dtype] * 1e9 / flops
        table = [{"run": r["run"], "tokens/s": f"{r['tokens_per_s']:.0f}", "peak RSS GiB": f"{r['peak_rss_gib']:.2f}",
                  f"loss @ step {args.steps}": f"{r['final_loss']:.4f}", "val loss": f"{r['val_loss']:.4f}"}
                 for r in work["rows"]]
        print(f"\n{work['batch_size']} x {work['seq_len']}-token rows:")
        print_table(table, list(table[0]))
        ours = work["ours"]
        print(f"  homebake: {ours['tokens_per_s'] / roof_tokens:.0%} of the {ours_dtype} matmul roofline "
              f"({flops / 1e9:.3f} GFLOP per token -> {roof_tokens:.0f} tokens/s at {roofline[ours_dtype]:.0f} GFLOP/s)")
        if not work["peers"]:
            continue
        best = max(work["peers"], key=lambda r: r["tokens_per_s"])
        speed = ours["tokens_per_s"] / best["tokens_per_s"]
        memory = ours["peak_rss_gib"] / best["peak_rss_gib"]
        loss_gap = abs(ours["final_loss"] - best["final_loss"]) / best["final_loss"]
        val_gap = abs(ours["val_loss"] - best["val_loss"]) / best["val_loss"]
        target = speed_target if work is workloads[0] else LONG_ROW_TARGET
        print(f"  vs the peer's best ({best['run']}):")
        print(f"  tokens/s ratio   {speed:.2f}x   (target >= {target}x)   {'met' if speed >= target else 'NOT met'}")
        if work is workloads[0]:
            print(f"  peak RSS ratio   {memory:.2f}x   (target <= {MEMORY_TARGET}x)   "
                  f"{'met' if memory <= MEMORY_TARGET else 'NOT met'}")
        else:
            print(f"  peak RSS ratio   {memory:.2f}x")
            keep = ours["tokens_per_s"] / workloads[0]["ours"]["tokens_per_s"]
            print(f"  our tokens/s vs our {workloads[0]['seq_len']}-token rows   {keep:.2f}x   (target >= "
                  f"{LONG_ROW_KEEP}x)   {'met' if keep >= LONG_ROW_KEEP else 'NOT met'}")
        print(f"  final loss       {ours['final_loss']:.4f} vs {best['final_loss']:.4f} ({100 * loss_gap:.1f}% apart; "
              f"target <= 2%)   {'met' if loss_gap <= LOSS_TARGET else 'NOT met'}")
        print(f"  validation loss  {ours['val_loss']:.4f} vs {best['val_loss']:.4f} ({100 * val_gap:.1f}% apart)")
        summary.append({"seq_len": work["seq_len"], "speed_ratio": speed, "memory_ratio": memory,
                        "roofline_share": ours["tokens_per_s"] / roof_tokens})
    if args.json:
        Path(args.json).write_text(json.dumps({"roofline_gflops": roofline, "workloads": workloads,
                                               "summary": summary}, indent=1))
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
