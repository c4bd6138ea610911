"""`homebake setup`: fetch the default model into the user cache (idempotent)."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser("setup", help="fetch the default model once into the user cache")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..default_model import ensure_default_model

    path = ensure_default_model()
    print(f"homebake: default model ready at {path}")
    return 0
