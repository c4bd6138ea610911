"""`homebake merge RUN_OR_ADAPTER --out DIR`: the adapter merged into its base, as a transformers folder
(an alias of `homebake export --format hf`)."""

from __future__ import annotations

from .export import add_export_args, run


def register(subparsers) -> None:
    parser = subparsers.add_parser("merge", help="merge an adapter into its base model (= export --format hf)",
                                   description=__doc__)
    add_export_args(parser, with_format=False)
    parser.set_defaults(func=run, format="hf", quant=None)
