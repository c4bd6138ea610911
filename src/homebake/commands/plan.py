"""`homebake plan --model M [--method M] [--data D | --seq-len N] [--memory 16GB] [--device cpu|cuda|mps]`: what
fits, before anything is loaded.

For each method, with and without gradient checkpointing: the predicted peak memory (the planner `train` runs,
over the model built on the meta device: a config.json, a GGUF's metadata or a hub id in the cache is enough), a
rough tokens/s on this machine's CPU, and which standard memory tiers it fits; then the settings `homebake
train` would choose in --memory (default: 85% of what is available here).
"""

from __future__ import annotations

from pathlib import Path

DEFAULT_SEQ_LEN = 2048


def register(subparsers) -> None:
    from ..train.config import METHODS, PRECISIONS

    parser = subparsers.add_parser(
        "plan", help="what fits: predicted peak memory and speed of each method, without loading the weights",
        description="Predict, without reading a weight, the peak memory (and a rough speed on this CPU) of each "
                    "way to fine-tune a model, which memory tiers it fits, and what `homebake train` would "
                    "choose in --memory.")
    parser.add_argument("--model", default=None, help="HF folder, config.json, .gguf file or cached hub id "
                                                      "(default: the default model)")
    parser.add_argument("--method", choices=METHODS, default=None,
                        help="plan this method only (default: all; train's choice is shown for lora)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--data", nargs="+", default=None, metavar="FILE",
                        help="size the rows by this dataset (as train would: its longest example, rounded up)")
    source.add_argument("--seq-len", type=int, default=None, metavar="N",
                        help=f"rows of N tokens (default: {DEFAULT_SEQ_LEN})")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N",
                        help="rows per micro-batch in the table (default: 1)")
    parser.add_argument("--memory", default=None, metavar="SIZE",
                        help="the machine's memory, e.g. 16GB: train's choice is shown for 85%% of it "
                             "(default: what is available here)")
    parser.add_argument("--device", choices=("cpu", "cuda", "mps"), default="cpu",
                        help="plan for this device's memory model (default: cpu)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto (bf16 on GPUs and on CPUs with native bf16, else fp32), bf16 or fp32")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..device import has_fast_bf16
    from ..errors import ConfigError
    from ..model.load import read_model_args
    from ..train.fit import fit_to_memory, memory_budget, parse_memory
    from ..train.forecast import METHOD_ORDER, TIERS_GIB, matmul_rate, options, parameter_count, planner
    from ..train.plan import GIB, available_memory, weight_file_bytes
    from ..train.config import TrainConfig

    for flag, value in (("--seq-len", args.seq_len), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ConfigError(f"must be at least 1, got {value}", where=flag, fix="e.g. 2048 tokens, 1 row")
    model_args, path, kind = read_model_args(args.model)
    if args.precision == "fp32" or (args.precision == "auto" and args.device == "cpu"
                                    and not has_fast_bf16(torch.device("cpu"))):
        dtype = torch.float32
    else:
        dtype = torch.bfloat16
    config = TrainConfig(model=args.model, method=args.method or "lora")
    widest, where = _row_length(args, config, model_args)
    count = parameter_count(model_args)
    weights = weight_file_bytes(path)  # a bare config.json: none beside it
    file_bytes = weights or 2 * count  # only a configuration: as bf16 safetensors
    local = args.device == "cpu"
    rate = matmul_rate(dtype) if local else None
    common = dict(source_kind=kind, file_bytes=file_bytes, device_type=args.device, compute_dtype=dtype,
                  widest_row=widest)
    found = options(model_args, config, **common, rows=args.batch_size, rate=rate, parameters=count,
                    methods=[args.method] if args.method else METHOD_ORDER)

    name = Path(args.model).name if args.model else path.name
    size = f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.0f}M"
    stored = "its weight files" if weights else "no weights here: read as bf16 safetensors"
    print(f"{name}: {size} parameters ({kind}, {stored}); {args.batch_size} x {widest}-token rows ({where}); "
          f"{str(dtype).replace('torch.', '')} on {args.device}")
    tiers = "  ".join(f"{t:>3}G" for t in TIERS_GIB)
    print(f"{'method':<7} {'checkpointing':<13} {'peak GiB':>8} {'~tokens/s':>9}  {tiers}")
    for option in found:
        gib, needed = option.plan.total / GIB, option.plan.required / GIB
        marks = "  ".join(f"{'yes' if needed <= t * 0.85 else ' - ':>4}" for t in TIERS_GIB)
        speed = f"{option.tokens_per_s:9.0f}" if option.tokens_per_s else f"{'n/a':>9}"
        print(f"{option.method:<7} {'on' if option.checkpointing else 'off':<13} {gib:8.2f} {speed}  {marks}")
    print(f"(yes: fits in 85% of the tier, the weight file's pages in the peak left out: the kernel drops them; "
          f"tokens/s is rough, within ~2x{'' if local else ', and only for cpu'})")

    memory = parse_memory(args.memory, where="--memory") if args.memory else (
        available_memory(torch.device("cpu")) if local else None)
    budget, budget_text = memory_budget(None, memory)  # train's default share of the machine's memory
    chosen = TrainConfig(model=args.model, method=config.method)
    chosen.lora.use_dora = config.method == "dora"
    plan_for = planner(model_args, chosen, **common)
    try:
        reason = fit_to_memory(chosen, plan_for, budget, budget_text)
        print(f"homebake train --method {config.method} would choose: {reason}")
    except ConfigError as refused:
        print(f"homebake train --method {config.method} would refuse: {refused.message}; {refused.fix}")
    return 0


def _row_length(args, config, model_args) -> tuple[int, str]:
    """The widest row train would build: from --data (its longest example, rounded up), else --seq-len."""
    if not args.data:
        return args.seq_len or DEFAULT_SEQ_LEN, "--seq-len" if args.seq_len else "the default length"
    from ..model.load import load_tokenizer
    from ..train.data_stream import widest_row
    from ..train.defaults import resolve_max_seq_len
    from ..train.setup import load_examples

    config.data.paths = list(args.data)
    context = model_args.max_position_embeddings
    train, validation, _ = load_examples(config, load_tokenizer(args.model), context)
    resolve_max_seq_len(config, train + validation, context)
    return widest_row(train + validation, max_seq_len=config.data.max_seq_len,
                      packing=config.data.packing), "from --data"
