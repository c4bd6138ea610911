"""`homebake train [config.yaml] [--flags]`: fine-tune a model on a dataset (LoRA, DoRA, QLoRA or full)."""

from __future__ import annotations


def register(subparsers) -> None:
    from ..train.config import add_train_flags

    parser = subparsers.add_parser(
        "train", help="fine-tune a model on your data (LoRA, DoRA, QLoRA or full)",
        description="Fine-tune a model. Settings come from the defaults, then the YAML config file, then "
                    "the flags (flags win). The resolved config is saved as OUT/config.yaml.")
    parser.add_argument("config", nargs="?", default=None, help="YAML config file (optional)")
    add_train_flags(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..train.config import resolve_config
    from ..train.loop import train

    result = train(resolve_config(args))  # Ctrl-C / SIGTERM: checkpoint and a clean exit (see StopRequest)
    from ..report import write_report

    write_report(result.out_dir)  # report.html: config, loss curves, throughput, memory (compare adds before/after)
    summary = f"homebake: {result.stopped} at step {result.step}"
    if result.last_loss is not None:
        summary += f", train loss {result.last_loss:.4f}"
    if result.val_loss is not None:
        summary += f", validation loss {result.val_loss:.4f} (best {result.best_val_loss:.4f} at step {result.best_step})"
    if result.tokens_per_s:
        summary += f", {result.tokens_per_s:.0f} tokens/s"
    summary += f", peak RSS {result.peak_rss_gib:.2f} GiB; outputs in {result.out_dir}"
    print(summary)
    return 130 if result.stopped == "interrupted" else 0
