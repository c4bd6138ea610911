"""`homebake eval` (one model, optionally with an adapter) and `homebake compare` (base, few-shot and fine-tuned,
drift, and the exported GGUF)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import add_model_args

def _add_eval_args(parser, *, adapter_required: bool) -> None:
    add_model_args(parser)
    parser.add_argument("--adapter", "-a", required=adapter_required, default=None,
                        help="fine-tuned adapter: a training run folder (--out of homebake train) or a PEFT "
                             "adapter folder; its base is --model, else the adapter's recorded base")
    parser.add_argument("--data", "-d", required=True,
                        help="evaluation data (JSONL/JSON/CSV/Parquet, any format homebake train reads); chat "
                             "examples ending in an assistant turn are answered and scored against it")
    parser.add_argument("--format", default="auto", help="data format (as in homebake train); auto detects it")
    parser.add_argument("--max-examples", type=int, default=None, help="use only the first N examples")
    parser.add_argument("--generate", type=int, default=None,
                        help="greedy answers for the first N examples with a reference (default: all; 0: loss only)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="answer length limit (default: the longest reference + 16 tokens)")
    parser.add_argument("--max-seq-len", type=int, default=2048, help="longest example scored for the loss")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts answered together (and loss rows)")
    parser.add_argument("--samples", type=int, default=3, help="generations to print (all are in the JSON)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON instead of a table")


def register(subparsers) -> None:
    evaluate = subparsers.add_parser(
        "eval", help="loss, perplexity and task metrics of a model (optionally with an adapter) on a dataset",
        description="Validation loss and perplexity over the trained positions; for examples with a reference "
                    "answer, greedy answers scored by exact, normalised and per-field JSON match. Example: "
                    "homebake eval --adapter runs/extract --data examples/extract/test.jsonl")
    _add_eval_args(evaluate, adapter_required=False)
    evaluate.add_argument("--out", "-o", default=None, help="folder to write eval.json into")
    evaluate.set_defaults(func=run_eval)

    compare = subparsers.add_parser(
        "compare", help="base, few-shot prompted base and fine-tuned side by side, with verdicts and drift",
        description="The same evaluation for the base model, the base model prompted with a few training examples "
                    "(few-shot) and the fine-tuned one in one run, side by side, with a verdict (improved / no "
                    "change / worse), whether fine-tuning beat prompting, drift on general instructions, and "
                    "(--gguf) the exported file scored in llama.cpp. Writes compare.json and report.html into "
                    "--out (default: the adapter's training run folder).")
    _add_eval_args(compare, adapter_required=True)
    compare.add_argument("--out", "-o", default=None,
                         help="folder for compare.json and report.html (default: the training run folder "
                              "given as --adapter; nothing is written for a bare adapter without --out)")
    compare.add_argument("--shots", type=int, default=5,
                         help="training examples put in the base model's prompt as prior turns for the few-shot "
                              "baseline (default 5; 0 skips it)")
    compare.add_argument("--shots-data", action="append", default=None, metavar="FILE",
                         help="training data to take the shots from (default: the run's config.yaml data.paths; "
                              "needed for a bare adapter); examples that share a user turn with --data are never used")
    compare.add_argument("--shots-seed", type=int, default=0, help="seed of the (deterministic) choice of shots")
    compare.add_argument("--few-shot-loss", action="store_true",
                         help="also score the references' loss under the few-shot prompts (costs about as much "
                              "again as answering them)")
    compare.add_argument("--drift-data", default=None, metavar="FILE",
                         help="general instructions to measure drift on (JSONL of {\"prompt\": ...}; default: the "
                              "bundled 50; 'none' skips drift)")
    compare.add_argument("--no-drift", dest="drift", action="store_false", help="do not measure drift")
    compare.add_argument("--drift-max-new-tokens", type=int, default=48, help="answer length on the drift set")
    compare.add_argument("--gguf", default=None, metavar="FILE",
                         help="an exported GGUF to score in llama.cpp (llama-cpp-python) on the same examples, "
                              "side by side with homebake's merged model")
    compare.set_defaults(func=run_compare)


def _options(args):
    from ..evaluate import EvalOptions

    options = EvalOptions(max_examples=args.max_examples, generate=args.generate, max_new_tokens=args.max_new_tokens,
                          max_seq_len=args.max_seq_len, batch_size=args.batch_size, generation_batch=args.batch_size)
    options.validate()
    return options


def _progress(label: str):
    def say(message: str) -> None:
        print(f"homebake: {label}: {message}", file=sys.stderr, flush=True)

    return say


def metrics_table(columns: list[tuple[str, dict]], *, change: str = "change") -> str:
    """The before/after table (homebake.metrics.metric_rows) as text: one column per result, and with two or
    more a change column (last - first: fine-tuned - base)."""
    from ..metrics import format_change, format_value, metric_rows

    with_change = len(columns) >= 2
    header = ["metric"] + [name for name, _ in columns] + ([change] if with_change else [])
    rows = [header]
    for row in metric_rows([result for _, result in columns]):
        label = f"  {row.label}" if row.field_name else row.label
        cells = [label] + [format_value(v, row.kind) for v in row.values]
        if with_change:
            cells.append(format_change(row))
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row))
             for row in rows]
    return "\n".join(line.rstrip() for line in lines)


def samples_text(samples_by_name: list[tuple[str, list[dict]]], limit: int) -> str:
    lines = []
    first = samples_by_name[0][1]
    width = max(11, *(len(name) + 1 for name, _ in samples_by_name))
    for index in range(min(limit, len(first))):
        sample = first[index]
        lines.append(f"[{sample['source']}] {sample['prompt']}")
        lines.append(f"  {'reference:':<{width}} {sample['reference']}")
        for name, samples in samples_by_name:
            if index < len(samples):
                mark = "✓" if samples[index]["exact"] else "✗"
                lines.append(f"  {name + ':':<{width}} {mark} {samples[index]['output']}")
    return "\n".join(lines)


def _data_note(result: dict, data: str) -> str:
    generated = (result.get("task") or {}).get("count", 0)
    text = f"{data}: {result['examples']} examples, {result['trained_tokens']:,} trained tokens"
    if generated:
        text += f", {generated} answered"
        if result.get("generation_tokens_per_s"):
            text += f" ({result['generation_tokens_per_s']:.0f} tokens/s)"
    if result.get("skipped"):
        text += f", {result['skipped']} skipped (see homebake data check)"
    return text


def run_eval(args) -> int:
    from ..evaluate import evaluate_model, load_eval_data, write_json
    from ..sources import describe_model, open_model

    options = _options(args)
    subject = open_model(args.model, args.adapter, device=args.device, dtype=args.dtype)
    subject.use_tuned()
    loaded = subject.loaded
    data = load_eval_data(args.data, loaded.tokenizer, options, data_format=args.format)
    result = evaluate_model(loaded.model, loaded.tokenizer, data, options, progress=_progress("eval")).to_dict()
    record = {"model": describe_model(args.model), "adapter": args.adapter, "data": args.data, **result}
    if args.out:
        path = write_json(Path(args.out) / "eval.json", record)
        print(f"homebake: wrote {path}", file=sys.stderr)
    if args.json:
        print(json.dumps(record, indent=1, ensure_ascii=False))
        return 0
    print(f"{subject.description}\n{_data_note(result, args.data)}\n")
    print(metrics_table([("value", result)]))
    if result["samples"] and args.samples:
        print()
        print(samples_text([("output", result["samples"])], args.samples))
    return 0


def default_compare_out(adapter: str) -> Path | None:
    """A training run folder (it has config.yaml) gets compare.json and the report; a bare adapter does not."""
    from ..run_folder import is_run

    return Path(adapter) if is_run(adapter) else None


def _compare_options(args):
    from ..evaluate import CompareOptions

    drift_data = args.drift_data
    drift = args.drift and not (drift_data is not None and drift_data.strip().lower() == "none")
    return CompareOptions(shots=args.shots, shots_data=args.shots_data, shots_seed=args.shots_seed,
                          few_shot_loss=args.few_shot_loss, drift=drift,
                          drift_data=drift_data if drift else None, drift_max_new_tokens=args.drift_max_new_tokens,
                          gguf=args.gguf)


def system_columns(record: dict) -> list[tuple[str, dict]]:
    """(column name, result) of compare.json's systems in table order: base, few-shot (if measured), fine-tuned."""
    columns = [("base", record["base"])]
    if record.get("few_shot"):
        shots = (record["few_shot"].get("shots") or {}).get("shots")
        columns.append((f"{shots}-shot" if shots else "few-shot", record["few_shot"]))
    columns.append(("fine-tuned", record["fine_tuned"]))
    return columns


def run_compare(args) -> int:
    from ..evaluate import comparison_record, run_comparison, write_json
    from ..report import write_report
    from ..run_folder import COMPARE_FILE

    options = _options(args)
    comparison = run_comparison(args.model, args.adapter, args.data, options, _compare_options(args),
                                device=args.device, dtype=args.dtype, data_format=args.format, progress=_progress)
    record = comparison_record(args.model, args.adapter, args.data, comparison)
    out = Path(args.out) if args.out else default_compare_out(args.adapter)
    if out is not None:
        write_json(out / COMPARE_FILE, record)
        report = write_report(out, comparison=record)
        print(f"homebake: wrote {out / COMPARE_FILE} and {report}", file=sys.stderr)
    if args.json:
        print(json.dumps(record, indent=1, ensure_ascii=False))
        return 0
    columns = system_columns(record)
    print(f"{comparison.description}\n{_data_note(record['fine_tuned'], args.data)}\n")
    print(metrics_table(columns, change="change vs base" if len(columns) > 2 else "change"))
    if record["fine_tuned"]["samples"] and args.samples:
        print()
        print(samples_text([(name, result["samples"]) for name, result in columns], args.samples))
    print()
    print("\n".join(verdict_lines(record)))
    return 0


def verdict_line(record: dict) -> str:
    verdict = record["verdict"]
    line = f"verdict: {verdict['label'].upper()} — {verdict['reason']}"
    by_loss = record.get("loss_verdict")
    if by_loss and by_loss is not verdict and by_loss.get("metric") != verdict.get("metric"):
        line += f"\n         ({by_loss['reason']})"
    return line


def verdict_lines(record: dict) -> list[str]:
    """The verdict, then prompting vs fine-tuning, drift, the exported file and what was not measured."""
    lines = [verdict_line(record)]
    prompting = record.get("prompting_verdict")
    if prompting:
        lines.append(f"prompting vs fine-tuning: {prompting['label'].upper()} — {prompting['reason']}")
    drift = record.get("drift")
    if drift:
        lines.append(f"drift: {drift['level'].upper()} — {drift['reason']}")
    gguf = record.get("gguf")
    if gguf and gguf.get("verdict"):
        lines.append(f"exported GGUF: {gguf['verdict']['label'].upper()} — {gguf['verdict']['reason']}")
    lines += [f"note: {note}" for note in record.get("notes") or []]
    return lines
