"""`homebake demo`: fine-tune, compare base vs fine-tuned on held-out data, export GGUF, write the report."""

from __future__ import annotations

from pathlib import Path

from ..default_model import DEFAULT_MODEL_NAME


def register(subparsers) -> None:
    from ..demo import DATA_DIR, DemoSettings

    defaults = DemoSettings()
    parser = subparsers.add_parser(
        "demo", help="the whole story in minutes: fine-tune, measure before/after, export GGUF, report",
        description="Fine-tune the default model (LoRA) on the bundled extraction dataset (free-text orders -> "
                    "one strict line of JSON), compare base and fine-tuned on the held-out split, export a GGUF, "
                    "write report.html and print the verdict and where everything is.")
    parser.add_argument("--out", "-o", type=Path, default=defaults.out, help="folder for the run and its outputs")
    parser.add_argument("--overwrite", action="store_true", help="run again in an existing --out folder")
    parser.add_argument("--model", "-m", default=None, help=f"model to fine-tune (default: {DEFAULT_MODEL_NAME})")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR,
                        help="folder with train.jsonl, valid.jsonl and test.jsonl (default: examples/extract)")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps, help="optimizer steps")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate, help="peak learning rate")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size, help="packed rows per step")
    parser.add_argument("--test-examples", type=int, default=None, help="use only the first N held-out examples")
    parser.add_argument("--quant", default=defaults.quant, help="GGUF type of the export (e.g. Q8_0, Q4_K_M, F16)")
    parser.add_argument("--shots", type=int, default=defaults.shots,
                        help="training examples in the few-shot baseline's prompt (0: no baseline)")
    parser.add_argument("--no-drift", dest="drift", action="store_false",
                        help="do not measure drift on the bundled general instructions")
    parser.add_argument("--no-gguf-score", dest="score_gguf", action="store_false",
                        help="do not score the exported GGUF in llama.cpp (done when llama-cpp-python is installed)")
    parser.add_argument("--device", default="auto", help="auto (cuda > mps > cpu), cpu, cuda or mps")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no training progress bar")
    parser.set_defaults(func=run)


def run(args) -> int:
    import sys

    from ..demo import DemoSettings, run_demo, summary_lines
    from .evaluate import metrics_table, system_columns

    settings = DemoSettings(model=args.model, data_dir=args.data_dir, out=args.out, max_steps=args.max_steps,
                            learning_rate=args.learning_rate, batch_size=args.batch_size,
                            test_examples=args.test_examples, quant=args.quant, device=args.device,
                            overwrite=args.overwrite, progress=args.progress, shots=args.shots,
                            drift=args.drift, score_gguf=args.score_gguf)
    demo = run_demo(settings, say=lambda message: print(message, file=sys.stderr, flush=True))
    columns = system_columns(demo.comparison)
    print(metrics_table(columns, change="change vs base" if len(columns) > 2 else "change"))
    print()
    print("\n".join(summary_lines(demo, settings.model)))
    return 0
