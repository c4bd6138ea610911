"""`homebake train [config.yaml] [--flags]`: fine-tune a model on a dataset (LoRA, DoRA, QLoRA or full)."""

from __future__ import annotations

import os


def register(subparsers) -> None:
    from ..train.config import add_train_flags

    parser = subparsers.add_parser(
        "train", help="fine-tune a model on your data (LoRA, DoRA, QLoRA or full)",
        description="Fine-tune a model. Settings come from the defaults, then the YAML config file, then "
                    "the flags (flags win). The resolved config is saved as OUT/config.yaml.")
    parser.add_argument("config", nargs="?", default=None, help="YAML config file (optional)")
    parser.add_argument("--nproc-per-node", type=int, default=None, metavar="N", dest="nproc_per_node",
                        help="train in N processes on this machine (one per GPU; on a CPU, gloo), started through "
                             "torch.distributed.run; --batch-size is then per process. Several machines: run "
                             "`torchrun ... -m homebake train` on each (docs/train.md)")
    add_train_flags(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ConfigError, HomebakeError
    from ..train.config import resolve_config
    from ..train.distributed import launch, launched_by_torchrun
    from ..train.loop import train

    nproc, under_torchrun = args.nproc_per_node, launched_by_torchrun()
    try:
        if nproc is not None and under_torchrun:
            raise ConfigError("--nproc-per-node is given to homebake train under torchrun", where="--nproc-per-node",
                              fix="drop it: torchrun's own --nproc-per-node sets the processes")
        if nproc is not None and nproc < 1:
            raise ConfigError(f"must be at least 1, got {nproc}", where="--nproc-per-node",
                              fix="use the number of GPUs (or CPU processes) to train with, e.g. 2")
        config = resolve_config(args)
    except HomebakeError as error:
        if under_torchrun and os.environ.get("RANK", "0") != "0":
            error.silent = True  # every rank read the same command line: rank 0 says it
        raise
    if nproc is not None and nproc > 1:
        return launch(nproc, _without_nproc(args.argv), config)
    result = train(config)  # Ctrl-C / SIGTERM: checkpoint and a clean exit (see StopRequest)
    if not result.is_main:  # rank 0 reports for the whole job
        return 130 if result.stopped == "interrupted" else 0
    from ..report import write_report

    write_report(result.out_dir)  # report.html: config, loss curves, throughput, memory (compare adds before/after)
    summary = f"homebake: {result.stopped} at step {result.step}"
    if result.last_loss is not None:
        summary += f", train loss {result.last_loss:.4f}"
    if result.val_loss is not None:
        summary += f", validation loss {result.val_loss:.4f} (best {result.best_val_loss:.4f} at step {result.best_step})"
    if result.tokens_per_s:
        summary += f", {result.tokens_per_s:.0f} tokens/s"
    planned = ""
    if result.planned_gib is not None:
        bound = f"; at most {result.bound_gib:.2f} GiB over a long run" if result.bound_gib > result.planned_gib else ""
        planned = f" (planned {result.planned_gib:.2f} GiB{bound})"
    summary += f", peak memory {result.peak_memory_gib:.2f} GiB{planned}; outputs in {result.out_dir}"
    print(summary)
    return 130 if result.stopped == "interrupted" else 0


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line for each rank: the same one, less --nproc-per-node N (it must not launch again)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--nproc-per-node":
            skip = True
        elif not item.startswith("--nproc-per-node="):
            out.append(item)
    return out
