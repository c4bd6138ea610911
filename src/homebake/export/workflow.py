"""The export workflow as one library function: ``export_model(source, format, out, ...)``.

``homebake export`` / ``homebake merge`` parse arguments into it and the demo calls it directly. Every format
checks its settings before the (slow) loading and quantisation, so a refusal costs nothing, and writes its
folder atomically (``fsutil.output_dir``): a failed export never replaces a good one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import ExportError

FORMATS = ("hf", "peft", "gguf", "gguf-lora", "ollama")
DEFAULT_QUANT = {"gguf": "Q8_0", "ollama": "Q4_K_M", "gguf-lora": "F32"}


@dataclass
class ExportResult:
    out: Path
    files: list[Path]  # what the output folder holds, sorted
    notes: list[str] = field(default_factory=list)  # what to do next (e.g. the ollama create command)


def resolve_quant(fmt: str, quant: str | None) -> str | None:
    """The GGUF type for ``fmt`` (its default when ``quant`` is None), or a one-line refusal."""
    from .gguf import check_quant
    from .gguf_lora import LORA_TYPES

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}", where="--format", fix=f"use one of {', '.join(FORMATS)}")
    if fmt in ("gguf", "ollama"):
        return check_quant(quant or DEFAULT_QUANT[fmt])
    if fmt == "gguf-lora":
        chosen = (quant or DEFAULT_QUANT[fmt]).upper()
        if chosen not in LORA_TYPES:
            raise ExportError(f"unknown GGUF LoRA type {quant!r}", where="--quant",
                              fix=f"use one of {', '.join(LORA_TYPES)}")
        return chosen
    if quant:
        raise ExportError(f"--quant applies to gguf, gguf-lora and ollama, not {fmt}", where="--quant",
                          fix="drop --quant, or choose --format gguf")
    return None


def check_out(out: str | Path, *, force: bool) -> Path:
    out = Path(out).expanduser()
    if out.exists() and not force:
        raise ExportError("the output already exists", where=str(out),
                          fix="choose another --out, or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise ExportError("the output path is a file", where=str(out), fix="--out names a folder")
    return out


def export_model(source: str | Path, format: str, out: str | Path, *, quant: str | None = None,
                 model: str | None = None, force: bool = False, dtype: str = "auto", max_shard_size: str = "2GB",
                 name: str | None = None, say: Callable[[str], None] | None = None) -> ExportResult:
    """Export a training run, PEFT adapter, model folder or ``.gguf`` (``source``) as ``format`` into ``out``.

    ``model`` is the base of an adapter (default: the adapter's recorded base / the run's config); ``quant`` the
    GGUF type (default Q8_0 for gguf, Q4_K_M for ollama, F32 for gguf-lora); ``dtype`` and ``max_shard_size``
    apply to hf; ``name`` is the GGUF ``general.name`` and Ollama model name.
    """
    from ..sources import open_source

    out = check_out(out, force=force)
    quant = resolve_quant(format, quant)
    opened = open_source(source, model=model)
    if say is not None:
        say(f"homebake export: {opened.kind} {opened.path}" + (f" on base {opened.base}" if opened.base else "")
            + f" -> {format}{' ' + quant if quant else ''} in {out}")
    name = name or opened.path.name.removesuffix(".gguf") or "homebake-model"
    notes: list[str] = []
    if format == "peft":
        _export_peft(opened, out, force)
    elif format == "gguf-lora":
        _export_gguf_lora(opened, out, quant, name, force)
    elif format == "hf":
        from ..model.save import save_hf_model

        save_hf_model(opened.loaded, out, state_dict=opened.merged_state_dict(), dtype=dtype,
                      max_shard_size=max_shard_size, overwrite=force)
    else:
        notes += _export_gguf(opened, out, quant, name, force, ollama=format == "ollama")
    return ExportResult(out, sorted(out.iterdir()), notes)


def _export_peft(source, out: Path, force: bool) -> None:
    from ..adapters.peft import save_peft_adapter

    if source.kind != "adapter":
        raise ExportError(f"a {'full fine-tune' if source.kind == 'full' else 'model'} has no adapter",
                          where=str(source.path), fix="export the whole model with --format hf (or gguf)")
    save_peft_adapter(out, source.adapter_state, source.lora_config, source.base, overwrite=force)


def _export_gguf_lora(source, out: Path, quant: str, name: str, force: bool) -> None:
    from ..fsutil import output_dir
    from .gguf_lora import refuse_unless_plain_lora, write_gguf_lora

    refuse_unless_plain_lora(source.method, str(source.path))
    with output_dir(out, overwrite=force) as tmp:
        write_gguf_lora(tmp / f"{name}-lora-{quant}.gguf", source.adapter_state, source.lora_config,
                        source.loaded.args, tensor_type=quant, name=name)


def _export_gguf(source, out: Path, quant: str, name: str, force: bool, *, ollama: bool) -> list[str]:
    from ..fsutil import output_dir
    from . import ollama as ollama_mod
    from .gguf import tokenizer_gguf_metadata, write_model_gguf

    tokenizer = source.loaded.tokenizer
    gguf_name = f"{name}-{quant}.gguf"
    template = None
    if ollama:  # decide the template before the (slow) quantisation, so a refusal costs nothing
        ends = [tokenizer.id_to_token(i) for i in sorted(tokenizer.end_token_ids)]
        template = ollama_mod.ollama_template(
            tokenizer.chat_template,
            lambda messages, generation: tokenizer.render_chat(messages, add_generation_prompt=generation), ends)
    state = source.merged_state_dict()
    with output_dir(out, overwrite=force) as tmp:
        write_model_gguf(tmp / gguf_name, state, source.loaded.args,
                         tokenizer_metadata=tokenizer_gguf_metadata(tokenizer), quant=quant, name=name)
        if template is not None:
            (tmp / "Modelfile").write_text(ollama_mod.modelfile_text(gguf_name, template), encoding="utf-8")
    if template is None:
        return []
    model_name = ollama_mod.ollama_model_name(name)
    return [f"to run it: {ollama_mod.create_command(model_name, out / 'Modelfile')} && ollama run {model_name}"]
