"""`TrainConfig`: every training setting with help text; defaults < YAML file < CLI flags.

The data pipeline's `DataConfig` and the adapters' `LoraConfig` are embedded as the `data:` and `lora:`
sections. The CLI flags are generated from the dataclasses, so a new field is a new flag with its help:
top-level fields are ``--field-name``; data fields are ``--field-name`` too (``--data`` adds training
files) unless the name clashes, then ``--data-field-name``; LoRA fields are ``--lora-field-name``.
The resolved config is written as ``config.yaml`` next to the run's outputs and reused by ``--resume``.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..adapters.config import INITS, LoraConfig
from ..data.config import FORMATS, TRAIN_ON, TRUNCATION, DataConfig
from ..default_model import DEFAULT_MODEL_NAME
from ..errors import ConfigError
from ..run_folder import CONFIG_FILE

METHODS = ("lora", "dora", "qlora", "full")
OBJECTIVES = ("sft", "dpo", "orpo")
PRECISIONS = ("auto", "bf16", "fp32")
SCHEDULES = ("constant", "linear", "cosine")


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainConfig:
    model: str | None = field(default=None, metadata=_help(
        f"model to fine-tune: HF folder, .gguf file, hub id, or {DEFAULT_MODEL_NAME} (the default)"))
    method: str = field(default="lora", metadata=_help(
        "lora, dora (weight-decomposed LoRA), qlora (LoRA over an NF4-quantised frozen base) or full"))
    out: str = field(default="homebake-run", metadata=_help(
        "output folder: config.yaml, metrics.jsonl, loss.png, checkpoints/ and the final adapter/weights"))
    data: DataConfig = field(default_factory=DataConfig, metadata=_help("data pipeline settings"))
    lora: LoraConfig = field(default_factory=LoraConfig, metadata=_help("LoRA/DoRA/QLoRA adapter settings"))

    batch_size: int | None = field(default=None, metadata=_help(
        "rows (packed sequences) per micro-batch; with several ranks, per rank (the global batch is N times it); "
        "default: 8 rows per optimizer step, as many per micro-batch as fit in memory (the rest accumulated)"))
    grad_accum: int = field(default=1, metadata=_help(
        "micro-batches per optimizer step; the loss is normalised by the trained tokens of all of them"))
    learning_rate: float | None = field(default=None, metadata=_help(
        "peak learning rate (default: 2e-4 for lora/dora/qlora, 2e-5 for full)"))
    schedule: str = field(default="cosine", metadata=_help("learning-rate schedule: constant, linear or cosine"))
    warmup_steps: int | None = field(default=None, metadata=_help(
        "linear warm-up steps (default: warmup_ratio of the total steps)"))
    warmup_ratio: float = field(default=0.03, metadata=_help("warm-up as a fraction of the total steps"))
    min_lr_ratio: float = field(default=0.1, metadata=_help("linear/cosine decay ends at this fraction of the peak"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay (not applied to norms/biases)"))
    adam_beta1: float = field(default=0.9, metadata=_help("AdamW beta1"))
    adam_beta2: float = field(default=0.999, metadata=_help("AdamW beta2"))
    adam_eps: float = field(default=1e-8, metadata=_help("AdamW epsilon"))
    max_grad_norm: float = field(default=1.0, metadata=_help("clip the gradient norm to this (0 disables)"))

    objective: str = field(default="sft", metadata=_help(
        "sft (next-token loss on the replies), dpo (preference pairs; the reference is the base model: adapters "
        "disabled, or a frozen copy for --method full) or orpo (preference pairs, reference-free)"))
    dpo_beta: float = field(default=0.1, metadata=_help(
        "DPO's beta: how far the tuned model may move from the reference (higher: closer to it)"))
    dpo_label_smoothing: float = field(default=0.0, metadata=_help(
        "DPO label smoothing in [0, 0.5): the assumed share of pairs labelled the wrong way round (cDPO)"))
    orpo_lambda: float = field(default=0.1, metadata=_help(
        "ORPO's lambda: weight of the odds-ratio term next to the chosen replies' token loss"))

    precision: str = field(default="auto", metadata=_help(
        "auto (bf16 where the device computes it natively: GPUs, CPUs with AVX512-BF16/AMX; else fp32), "
        "bf16 (frozen weights and activations in bf16, "
        "trainable weights and optimizer in fp32) or fp32"))
    device: str = field(default="auto", metadata=_help("auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps"))
    gradient_checkpointing: bool | None = field(default=None, metadata=_help(
        "recompute each layer's activations in backward: less memory, ~30% slower (default: only when the run "
        "does not fit in memory without it)"))
    memory_limit: str | None = field(default=None, metadata=_help(
        "memory the run may use, e.g. 12GB (binary units; default: 85% of the memory available at the start); "
        "unset batch size and checkpointing are chosen to fit it, and a run that cannot fit is refused"))
    seed: int = field(default=0, metadata=_help("seed for adapter initialisation and dropout"))
    fsdp: bool = field(default=False, metadata=_help(
        "several ranks (torchrun / --nproc-per-node): shard every weight over the ranks with FSDP2 (the default "
        "for --method full); without it adapters train with DDP, each rank holding the whole frozen base"))
    dist_timeout_minutes: float = field(default=10.0, metadata=_help(
        "several ranks: a rank that waits this long for the others (one died or hangs) ends the job"))

    max_steps: int | None = field(default=None, metadata=_help("stop after this many optimizer steps"))
    epochs: float | None = field(default=None, metadata=_help(
        "passes over the training data (fractions allowed); default: 1, or more so that at least 60 optimizer "
        "steps happen (at most 5 epochs)"))
    max_minutes: float | None = field(default=None, metadata=_help(
        "stop (with a checkpoint) after this much training wall time"))

    eval_every: int = field(default=50, metadata=_help("evaluate on the validation set every N steps (0: only at the end)"))
    eval_batches: int | None = field(default=None, metadata=_help("limit each evaluation to this many batches"))
    early_stopping_patience: int = field(default=0, metadata=_help(
        "stop when the validation loss has not improved for this many evaluations (0 disables)"))
    early_stopping_min_delta: float = field(default=0.0, metadata=_help(
        "an improvement smaller than this does not count for early stopping"))

    save_every: int = field(default=100, metadata=_help("write a checkpoint every N steps (and always at the end)"))
    keep_last: int = field(default=2, metadata=_help("checkpoints to keep besides the best one"))
    resume: bool = field(default=False, metadata=_help(
        "continue the run in --out from its latest checkpoint (its config.yaml is the base config)"))
    overwrite: bool = field(default=False, metadata=_help("start over in an --out folder that holds a previous run"))
    log_every: int = field(default=1, metadata=_help("write a metrics.jsonl line every N steps"))
    loss_chunk_rows: int | None = field(default=None, metadata=_help(
        "trained positions per LM-head chunk (default: ~32 MiB of logits in the compute dtype)"))
    progress: bool = field(default=True, metadata=_help("show a progress bar"))

    def resolved_learning_rate(self) -> float:
        if self.learning_rate is not None:
            return float(self.learning_rate)
        return 2e-5 if self.method == "full" else 2e-4

    def validate(self) -> None:
        def check(ok: bool, name: str, message: str, fix: str) -> None:
            if not ok:
                raise ConfigError(message, where=name, fix=fix)

        check(self.method in METHODS, "method", f"unknown method {self.method!r}", f"use one of {', '.join(METHODS)}")
        check(self.precision in PRECISIONS, "precision", f"unknown precision {self.precision!r}",
              f"use one of {', '.join(PRECISIONS)}")
        check(self.schedule in SCHEDULES, "schedule", f"unknown schedule {self.schedule!r}",
              f"use one of {', '.join(SCHEDULES)}")
        for name in ("grad_accum", "keep_last", "save_every", "log_every"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, f"must be an integer >= 1, got {value!r}", "e.g. 1")
        if self.memory_limit is not None:
            from .fit import parse_memory

            parse_memory(self.memory_limit)
        for name in ("batch_size", "max_steps", "eval_batches", "loss_chunk_rows"):
            value = getattr(self, name)
            check(value is None or (isinstance(value, int) and value >= 1), name,
                  f"must be an integer >= 1, got {value!r}", "leave it unset or use a positive integer")
        check(self.eval_every >= 0 and self.early_stopping_patience >= 0, "eval_every",
              "eval_every and early_stopping_patience must be >= 0", "use 0 to disable")
        check(self.epochs is None or self.epochs > 0, "epochs", f"must be > 0, got {self.epochs!r}", "e.g. 1 or 3")
        check(self.resolved_learning_rate() > 0, "learning_rate", "must be > 0", "e.g. 2e-4")
        check(0.0 <= self.warmup_ratio < 1.0 and 0.0 <= self.min_lr_ratio <= 1.0, "warmup_ratio",
              "warmup_ratio must be in [0, 1) and min_lr_ratio in [0, 1]", "e.g. 0.03 and 0.1")
        check(self.max_minutes is None or self.max_minutes > 0, "max_minutes", "must be > 0", "e.g. 30")
        check(self.dist_timeout_minutes > 0, "dist_timeout_minutes", "must be > 0", "e.g. 10")
        check(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0", "use 0 to disable clipping")
        check(self.objective in OBJECTIVES, "objective", f"unknown objective {self.objective!r}",
              f"use one of {', '.join(OBJECTIVES)}")
        check(self.dpo_beta > 0 and self.orpo_lambda >= 0, "dpo_beta", "dpo_beta must be > 0 and orpo_lambda >= 0",
              "e.g. 0.1")
        check(0.0 <= self.dpo_label_smoothing < 0.5, "dpo_label_smoothing", "must be in [0, 0.5)", "e.g. 0 or 0.1")
        if self.method == "dora":
            self.lora.use_dora = True
        check(not (self.method == "full" and self.lora.use_dora), "method", "DoRA is an adapter method",
              "use --method dora (or lora with --dora), not full")
        self.lora.validate()
        self.data.validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, out_dir: str | Path) -> Path:
        from ..fsutil import atomic_file

        path = Path(out_dir) / CONFIG_FILE
        data = self.to_dict()
        data["learning_rate"] = self.resolved_learning_rate()
        for transient in ("resume", "overwrite"):
            data.pop(transient)
        try:
            with atomic_file(path, "w") as handle:
                handle.write("# resolved homebake train config (defaults < YAML file < CLI flags)\n")
                yaml.safe_dump(data, handle, sort_keys=False)
        except OSError as error:
            from ..fsutil import write_error

            raise write_error(error, "the run's config", path) from None
        return path


# Nested sections: attribute name -> (dataclass, CLI flag prefix).
SECTIONS: dict[str, tuple[type, str]] = {"data": (DataConfig, ""), "lora": (LoraConfig, "lora-")}
# Flags spelled differently from their field, for the common case.
FLAG_ALIASES = {("data", "paths"): "--data", ("lora", "use_rslora"): "--rslora", ("lora", "use_dora"): "--dora"}
# Settings with a fixed set of values: the flag shows and checks them (`--method {lora,dora,qlora,full}`).
CHOICES = {"method": METHODS, "precision": PRECISIONS, "schedule": SCHEDULES, "data.format": FORMATS,
           "data.train_on": TRAIN_ON, "data.truncation": TRUNCATION, "lora.init": INITS}


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _yaml_value(text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise argparse.ArgumentTypeError(f"not valid YAML: {text!r}") from error


def _add_flag(group, flags: list[str], dest: str, tp, help_text: str) -> None:
    tp = _unwrap_optional(tp)
    origin = typing.get_origin(tp)
    # argparse %-formats help strings: a literal % ("~30% slower") must be doubled
    kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
    if dest in CHOICES:
        kwargs["choices"] = CHOICES[dest]
    elif tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin in (list, tuple):
        kwargs["nargs"] = "+"
        kwargs["metavar"] = "VALUE"
    elif tp is str:  # a path or a name: shown by its meaning (--out OUT, --model MODEL)
        kwargs["metavar"] = flags[0].lstrip("-").replace("-", "_").upper()
    elif tp in (int, float):
        kwargs["type"] = tp
        kwargs["metavar"] = tp.__name__.upper()
    else:  # dicts and unions: a YAML literal, e.g. '{messages: dialog}' or 'all-linear'
        kwargs["type"] = _yaml_value
        kwargs["metavar"] = "YAML"
    group.add_argument(*flags, **kwargs)


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field; unset flags stay absent from the namespace (so YAML values win)."""
    top = {f.name for f in dataclasses.fields(TrainConfig)}
    taken = {f"--{name.replace('_', '-')}" for name in top if name not in SECTIONS}
    main = parser.add_argument_group("training")
    hints = _field_types(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in SECTIONS:
            continue
        _add_flag(main, [f"--{f.name.replace('_', '-')}"], f.name, hints[f.name], f.metadata.get("help", ""))
    for section, (cls, prefix) in SECTIONS.items():
        group = parser.add_argument_group(f"{section} (the `{section}:` section of the config file)")
        hints = _field_types(cls)
        for f in dataclasses.fields(cls):
            name = f.name.replace("_", "-")
            flag = FLAG_ALIASES.get((section, f.name)) or f"--{prefix}{name}"
            if flag in taken or (prefix and name.startswith(prefix)):
                flag = f"--{section}-{name}" if flag in taken else f"--{name}"
            taken.add(flag)
            _add_flag(group, [flag], f"{section}.{f.name}", hints[f.name], f.metadata.get("help", ""))


def _coerce(values: dict, cls, where: str) -> dict:
    """Convert scalars to the field types (YAML reads `1e-3` as a string); wrong types name the field."""
    hints = _field_types(cls)
    out = dict(values)
    for name, value in values.items():
        tp = _unwrap_optional(hints[name])
        if value is None:
            if tp is hints[name] and not dataclasses.is_dataclass(tp):  # not Optional: a value is needed
                raise ConfigError("needs a value, got nothing (null)", where=f"{where} {name}",
                                  fix=f"set {name}, or leave it out for the default")
            continue
        if tp is str or typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
            out[name] = _strings(value, tp is str, f"{where} {name}")
            continue
        if tp not in (int, float, bool) or isinstance(value, bool) == (tp is bool) \
                and isinstance(value, tp if tp is not float else (int, float)):
            continue
        try:
            if tp is bool:
                text = str(value).strip().lower()
                if text not in ("true", "false", "yes", "no", "1", "0", "on", "off"):
                    raise ValueError(value)
                out[name] = text in ("true", "yes", "1", "on")
            elif isinstance(value, bool):
                raise ValueError(value)
            elif tp is int:
                number = float(value)
                if not number.is_integer():
                    raise ValueError(value)
                out[name] = int(number)
            else:
                out[name] = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"expected {'true/false' if tp is bool else tp.__name__}, got {_clip(value)}",
                              where=f"{where} {name}", fix=f"set {name} to a {tp.__name__}") from None
    return out


def _strings(value, single: bool, where: str):
    """A text setting (a number is taken as its text: `out: 2024`), or a list of them (a lone one is a list)."""
    def text(item):
        if isinstance(item, str):
            return item
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            return str(item)
        raise ConfigError(f"expected text, got {_clip(item)}", where=where, fix="write it as a string")

    if single:
        return text(value)
    return [text(item) for item in value] if isinstance(value, (list, tuple)) else [text(value)]


def _clip(value, limit: int = 60) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def _check_keys(values: dict, cls, where: str) -> None:
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(key) for key in set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}", where=where,
                          fix=suggest_setting(unknown[0], known))


def suggest_setting(name: str, known: list[str]) -> str:
    """"did you mean `learning_rate`?" for a misspelt setting, else where the settings are listed."""
    name = name.replace("-", "_")
    if "batch_size" in known:  # the top level: a section's setting written at the top?
        for section, (cls, _) in SECTIONS.items():
            if name in {f.name for f in dataclasses.fields(cls)}:
                return f"`{name}` is a `{section}:` setting: write it as {section}: {{{name}: ...}}"
    close = difflib.get_close_matches(name, known, n=2, cutoff=0.6)
    if close:
        return "did you mean " + " or ".join(f"`{c}`" for c in close) + "?"
    return "`homebake train --help` lists every setting (a section's settings go under `data:` or `lora:`)"


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise ConfigError(f"cannot read config file ({error.strerror})", where=str(path),
                          fix="check the path of the config file") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"the config file is not UTF-8 text (byte {error.start})", where=str(path),
                          fix="save it as UTF-8") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"invalid YAML ({getattr(error, 'problem', error)})", where=where,
                          fix="fix the YAML syntax") from error
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("the config file must be a mapping of settings", where=str(path),
                          fix="write `key: value` lines, e.g. `method: lora`")
    return data


def _merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        if key in SECTIONS and isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _normalise_sections(values: dict) -> dict:
    values = dict(values)
    data = values.get("data")
    if isinstance(data, (str, list)):  # `data: train.jsonl` shorthand
        values["data"] = {"paths": data if isinstance(data, list) else [data]}
    return values


def flags_to_dict(namespace: argparse.Namespace) -> dict[str, Any]:
    """The explicitly given flags as a nested config mapping."""
    out: dict[str, Any] = {}
    for key, value in vars(namespace).items():
        if key in ("func", "command", "debug", "config"):
            continue
        section, _, name = key.partition(".")
        if name and section in SECTIONS:
            out.setdefault(section, {})[name] = value
        elif not name and key in {f.name for f in dataclasses.fields(TrainConfig)}:
            out[key] = value
    return out


def build_config(*layers: tuple[dict[str, Any], str]) -> TrainConfig:
    """Merge (mapping, where) layers, lowest priority first, onto the defaults and validate."""
    merged: dict[str, Any] = {}
    for values, where in layers:
        values = _normalise_sections(values)
        _check_keys(values, TrainConfig, where)
        values = _coerce(values, TrainConfig, where)
        for section, (cls, _) in SECTIONS.items():
            if section in values:
                if not isinstance(values[section], dict):
                    raise ConfigError(f"`{section}` must be a mapping of settings", where=f"{where} {section}",
                                      fix=f"e.g. {section}: {{...}}")
                _check_keys(values[section], cls, f"{where} {section}")
                values[section] = _coerce(values[section], cls, f"{where} {section}")
        merged = _merge(merged, values)
    kwargs = {k: v for k, v in merged.items() if k not in SECTIONS}
    for section, (cls, _) in SECTIONS.items():
        try:
            kwargs[section] = cls(**merged.get(section, {}))
        except TypeError as error:
            raise ConfigError(f"invalid {section} settings ({error})", where=section,
                              fix="check the section's setting names and types") from error
    config = TrainConfig(**kwargs)
    config.validate()
    return config


def resolve_config(namespace: argparse.Namespace) -> TrainConfig:
    """defaults < the saved config of the run being resumed < the YAML file < CLI flags."""
    flags = flags_to_dict(namespace)
    file_values = read_yaml(namespace.config) if getattr(namespace, "config", None) else {}
    layers = [(file_values, str(getattr(namespace, "config", "") or "config")), (flags, "command line")]
    resume = flags.get("resume", file_values.get("resume", False))
    out = flags.get("out", file_values.get("out"))
    if resume is True and isinstance(out, str) and out and (Path(out) / CONFIG_FILE).is_file():
        layers.insert(0, (read_yaml(Path(out) / CONFIG_FILE), str(Path(out) / CONFIG_FILE)))
    return build_config(*layers)
