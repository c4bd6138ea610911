"""`homebake data check FILE --model M`: show what training will make of a dataset, token by token."""

from __future__ import annotations

import argparse
import os
import sys

from ..data.config import FORMATS, TRAIN_ON, TRUNCATION, DataConfig
from ..default_model import DEFAULT_MODEL_NAME
from ..errors import ConfigError, DataError


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="inspect datasets before training")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)
    check = commands.add_parser(
        "check", help="report formats, lengths, skipped lines and exactly which tokens will be learned",
        description="Read the data as training would and report: detected format per file, example and turn "
                    "counts, token lengths, the trained-token fraction, every skipped line with its reason, "
                    "and rendered examples with the trained tokens marked. Exits non-zero when nothing is "
                    "trainable.")
    helps = DataConfig.help()
    defaults = DataConfig()
    check.add_argument("paths", nargs="+", metavar="FILE", help=helps["paths"])
    check.add_argument("--model", "-m", default=None,
                       help="whose tokenizer and chat template to use: HF folder, .gguf file, hub id, or "
                            f"{DEFAULT_MODEL_NAME} (the default)")
    check.add_argument("--validation", default=None, help=helps["validation"])
    check.add_argument("--format", default=defaults.format, choices=FORMATS, help=helps["format"])
    check.add_argument("--field", action="append", default=[], metavar="OURS=YOURS", help=helps["fields"])
    check.add_argument("--role", action="append", default=[], metavar="YOURS=OURS", help=helps["roles"])
    check.add_argument("--train-on", default=defaults.train_on, choices=TRAIN_ON, help=helps["train_on"])
    check.add_argument("--max-seq-len", type=int, default=defaults.max_seq_len, help=helps["max_seq_len"])
    check.add_argument("--truncation", default=defaults.truncation, choices=TRUNCATION, help=helps["truncation"])
    check.add_argument("--dedup", action=argparse.BooleanOptionalAction, default=defaults.dedup, help=helps["dedup"])
    check.add_argument("--hub-split", default=defaults.hub_split, help=helps["hub_split"])
    check.add_argument("--strict", action="store_true", help=helps["strict"])
    check.add_argument("--preview", type=int, default=3, metavar="N", help="rendered examples to show (0: none)")
    check.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                       help="mark trained tokens with colour (auto: when printing to a terminal) or [[markers]]")
    check.set_defaults(func=run_check)


def _pairs(values: list[str], flag: str) -> dict[str, str]:
    pairs = {}
    for value in values:
        left, sep, right = value.partition("=")
        if not sep or not left.strip() or not right.strip():
            raise ConfigError(f"expected NAME=NAME, got {value!r}", where=flag, fix=f"e.g. {flag} messages=dialog")
        pairs[left.strip()] = right.strip()
    return pairs


def _use_color(choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    return sys.stdout.isatty() and not os.environ.get("NO_COLOR") and os.environ.get("TERM") != "dumb"


def run_check(args) -> int:
    from ..data.check import report
    from ..data.pipeline import prepare_dataset
    from ..model.load import load_tokenizer

    config = DataConfig(paths=list(args.paths), validation=args.validation, validation_fraction=0.0,
                        format=args.format, fields=_pairs(args.field, "--field"), roles=_pairs(args.role, "--role"),
                        hub_split=args.hub_split, train_on=args.train_on, max_seq_len=args.max_seq_len,
                        truncation=args.truncation, dedup=args.dedup, strict=args.strict)
    if args.preview < 0:
        raise ConfigError("must be >= 0", where="--preview", fix="e.g. --preview 3")
    tokenizer = load_tokenizer(args.model)
    prepared = prepare_dataset(config, tokenizer)
    print(report(prepared, tokenizer, config=config, preview=args.preview, color=_use_color(args.color)))
    if not prepared.train:
        counts = prepared.skip_counts()
        why = ", ".join(f"{kind} {count:,}" for kind, count in counts.most_common(3)) or "no examples"
        raise DataError(f"nothing is trainable ({why})", where=", ".join(args.paths),
                        fix="fix the lines listed above" + (" or raise --max-seq-len" if "too long" in counts else ""))
    return 0
