"""Arguments and loading shared by commands that take a model."""

from __future__ import annotations

import argparse

from ..default_model import DEFAULT_MODEL_NAME


def add_model_args(parser: argparse.ArgumentParser, *, dtype_default: str = "auto") -> None:
    parser.add_argument("--model", "-m", default=None,
                        help=f"HF folder, .gguf file, hub id, or {DEFAULT_MODEL_NAME} (the default)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", default=dtype_default,
                        help="auto (bf16 on GPUs that support it, fp32 on CPU), fp32, bf16 or fp16")


def add_adapter_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--adapter", "-a", default=None,
                        help="fine-tuned adapter to apply: a training run folder (--out of homebake train) or a "
                             "PEFT adapter folder (merged into the base weights; base: --model, else the "
                             "adapter's recorded base)")


def load_for_inference(args):
    """Load the model named by --model (with --adapter merged in, if given) onto --device in --dtype."""
    from ..sources import open_for_inference

    return open_for_inference(args.model, getattr(args, "adapter", None), device=args.device, dtype=args.dtype)
