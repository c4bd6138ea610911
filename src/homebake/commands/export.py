"""`homebake export RUN_OR_ADAPTER --format hf|peft|gguf|gguf-lora|ollama [--quant Q] --out DIR [--force]`."""

from __future__ import annotations

import argparse
import sys

from ..default_model import DEFAULT_MODEL_NAME
from ..export.workflow import FORMATS


def add_export_args(parser: argparse.ArgumentParser, *, with_format: bool = True) -> None:
    parser.add_argument("source", metavar="RUN_OR_ADAPTER",
                        help="training run folder (--out of homebake train), PEFT adapter folder, model folder, "
                             f".gguf or {DEFAULT_MODEL_NAME}")
    if with_format:
        parser.add_argument("--format", "-f", choices=FORMATS, default="hf",
                            help="hf: merged transformers folder; peft: adapter; gguf: merged GGUF; "
                                 "gguf-lora: adapter as GGUF (llama.cpp --lora, Ollama ADAPTER); "
                                 "ollama: merged GGUF + Modelfile")
        parser.add_argument("--quant", "-q", default=None,
                            help="GGUF type: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q4_K_M Q5_K_M Q6_K "
                                 "(default Q8_0 for gguf, Q4_K_M for ollama; F32/F16/Q8_0 for gguf-lora)")
    parser.add_argument("--out", "-o", required=True, help="output folder (refused if it exists, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing output folder")
    parser.add_argument("--model", "-m", default=None,
                        help="base model of an adapter (default: the adapter's base_model_name_or_path / run config)")
    parser.add_argument("--dtype", default="auto", help="hf: auto (keep the weights' dtype), fp32, bf16 or fp16")
    parser.add_argument("--max-shard-size", default="2GB", help="hf: split safetensors above this size")
    parser.add_argument("--name", default=None, help="model name (GGUF general.name, Ollama model name)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export a fine-tune as HF folder, PEFT adapter, GGUF or Ollama model",
                                   description=__doc__)
    add_export_args(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..export.workflow import export_model

    result = export_model(args.source, args.format, args.out, quant=args.quant, model=args.model, force=args.force,
                          dtype=args.dtype, max_shard_size=args.max_shard_size, name=args.name,
                          say=lambda message: print(message, file=sys.stderr, flush=True))
    for note in result.notes:
        print(note)
    for path in result.files:
        print(path)
    return 0
