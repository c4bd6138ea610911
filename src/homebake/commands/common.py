"""Arguments and loading shared by commands that take a model."""

from __future__ import annotations

import argparse


def add_model_args(parser: argparse.ArgumentParser, *, dtype_default: str = "auto") -> None:
    parser.add_argument("--model", "-m", default=None,
                        help="HF folder, .gguf file, hub id, or smollm2-135m-instruct (the default)")
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
    if getattr(args, "adapter", None):
        from ..evaluate import open_model

        subject = open_model(args.model, args.adapter, device=args.device, dtype=args.dtype)
        subject.use_tuned()
        return subject.loaded
    from ..device import pick_device, pick_dtype
    from ..model.load import load_model

    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device, prefer_bf16=device.type != "cpu")
    loaded = load_model(args.model, dtype=dtype, device=device)
    loaded.model.eval()
    return loaded
