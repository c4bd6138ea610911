"""`homebake export RUN_OR_ADAPTER --format hf|peft|gguf|gguf-lora|ollama [--quant Q] --out DIR [--force]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FORMATS = ("hf", "peft", "gguf", "gguf-lora", "ollama")
DEFAULT_QUANT = {"gguf": "Q8_0", "ollama": "Q4_K_M", "gguf-lora": "F32"}


def add_export_args(parser: argparse.ArgumentParser, *, with_format: bool = True) -> None:
    parser.add_argument("source", metavar="RUN_OR_ADAPTER",
                        help="training run folder (--out of homebake train), PEFT adapter folder, model folder or .gguf")
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


def _check_out(args) -> Path:
    from ..errors import ExportError

    out = Path(args.out).expanduser()
    if out.exists() and not args.force:
        raise ExportError("the output already exists", where=str(out),
                          fix="choose another --out, or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError("the output path is a file", where=str(out), fix="--out names a folder")
    return out


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args) -> int:
    from ..errors import ExportError
    from ..export.gguf import check_quant
    from ..export.gguf_lora import LORA_TYPES, refuse_unless_plain_lora
    from ..export.source import open_source

    fmt = args.format
    out = _check_out(args)
    quant = None
    if fmt in ("gguf", "ollama"):
        quant = check_quant(args.quant or DEFAULT_QUANT[fmt])
    elif fmt == "gguf-lora":
        quant = (args.quant or DEFAULT_QUANT[fmt]).upper()
        if quant not in LORA_TYPES:
            raise ExportError(f"unknown GGUF LoRA type {args.quant!r}", where="--quant",
                              fix=f"use one of {', '.join(LORA_TYPES)}")
    elif args.quant:
        raise ExportError(f"--quant applies to gguf, gguf-lora and ollama, not {fmt}", where="--quant",
                          fix="drop --quant, or choose --format gguf")

    source = open_source(args.source, model=args.model)
    _say(f"homebake export: {source.kind} {source.path}" + (f" on base {source.base}" if source.base else "")
         + f" -> {fmt}{' ' + quant if quant else ''} in {out}")
    if fmt == "peft":
        written = _export_peft(source, out, args)
    elif fmt == "gguf-lora":
        refuse_unless_plain_lora(source.method, str(source.path))
        written = _export_gguf_lora(source, out, quant, args)
    elif fmt == "hf":
        written = _export_hf(source, out, args)
    else:
        written = _export_gguf(source, out, quant, args, ollama=fmt == "ollama")
    for path in written:
        print(path)
    return 0


def _export_hf(source, out: Path, args) -> list[Path]:
    from ..model.save import save_hf_model

    state = source.merged_state_dict()
    save_hf_model(source.loaded, out, state_dict=state, dtype=args.dtype, max_shard_size=args.max_shard_size,
                  overwrite=args.force)
    return sorted(out.iterdir())


def _export_peft(source, out: Path, args) -> list[Path]:
    from ..errors import ExportError
    from ..adapters.peft import save_peft_adapter

    if source.kind != "adapter":
        raise ExportError(f"a {'full fine-tune' if source.kind == 'full' else 'model'} has no adapter",
                          where=str(source.path), fix="export the whole model with --format hf (or gguf)")
    save_peft_adapter(out, source.adapter_state, source.lora_config, source.base, overwrite=args.force)
    return sorted(out.iterdir())


def _name(source, args) -> str:
    return args.name or source.path.name.removesuffix(".gguf") or "homebake-model"


def _export_gguf_lora(source, out: Path, quant: str, args) -> list[Path]:
    from ..export.gguf_lora import write_gguf_lora
    from ..fsutil import output_dir

    with output_dir(out, overwrite=args.force) as tmp:
        write_gguf_lora(tmp / f"{_name(source, args)}-lora-{quant}.gguf", source.adapter_state, source.lora_config,
                        source.loaded.args, tensor_type=quant, name=_name(source, args))
    return sorted(out.iterdir())


def _export_gguf(source, out: Path, quant: str, args, *, ollama: bool) -> list[Path]:
    from ..export import ollama as ollama_mod
    from ..export.gguf import tokenizer_gguf_metadata, write_model_gguf
    from ..fsutil import output_dir

    tokenizer = source.loaded.tokenizer
    name = _name(source, args)
    gguf_name = f"{name}-{quant}.gguf"
    template = None
    if ollama:  # decide the template before the (slow) quantisation, so a refusal costs nothing
        ends = [tokenizer.id_to_token(i) for i in sorted(tokenizer.end_token_ids)]
        template = ollama_mod.ollama_template(
            tokenizer.chat_template,
            lambda messages, generation: tokenizer.render_chat(messages, add_generation_prompt=generation), ends)
    state = source.merged_state_dict()
    with output_dir(out, overwrite=args.force) as tmp:
        write_model_gguf(tmp / gguf_name, state, source.loaded.args, tokenizer_metadata=tokenizer_gguf_metadata(tokenizer),
                         quant=quant, name=name)
        if template is not None:
            (tmp / "Modelfile").write_text(ollama_mod.modelfile_text(gguf_name, template), encoding="utf-8")
    if template is not None:
        model_name = ollama_mod.ollama_model_name(name)
        print(f"to run it: {ollama_mod.create_command(model_name, out / 'Modelfile')} && ollama run {model_name}")
    return sorted(out.iterdir())
