"""``report.html``: one self-contained page per run that says, with numbers, whether fine-tuning helped.

The page has no scripts and loads nothing: charts are inline SVG drawn here, styles are inline, so it
opens offline and can be mailed around. Sections: the verdict, the before/after table (base, few-shot,
fine-tuned), the prompting baseline (did fine-tuning beat a few examples in the prompt?), drift on general
instructions, the exported file scored in llama.cpp, train and validation loss curves, throughput and peak
memory, generated samples side by side, and the resolved config. Everything it shows comes from files in the
run folder: ``config.yaml`` and ``metrics.jsonl`` (written by training) and ``compare.json`` (written by
``homebake compare`` / ``homebake demo``; an older one naming the fine-tuned result ``"tuned"`` is read too);
a section whose file is missing says so instead of disappearing.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .fsutil import atomic_file
from .metrics import format_change, format_value, metric_rows
from .run_folder import COMPARE_FILE, CONFIG_FILE, METRICS_FILE, REPORT_FILE, read_metrics

MAX_SAMPLES = 25
MAX_DRIFT_ROWS = 60
COLOURS = ("#2563eb", "#dc2626", "#059669", "#d97706")


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------- charts


@dataclass
class Series:
    label: str
    points: Sequence[tuple[float, float]]
    markers: bool = False  # draw a dot at every point (sparse series such as validation loss)


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """Round tick values covering [low, high] (1, 2 or 5 times a power of ten apart)."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    ticks = []
    value = first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 10))
        value += step
    if ticks[-1] < high:
        ticks.append(round(value, 10))
    return ticks


def _tick_label(value: float) -> str:
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    return f"{value:.3g}"


def line_chart(title: str, series: Sequence[Series], *, x_label: str, y_label: str,
               width: int = 640, height: int = 300, chart_id: str = "") -> str:
    """An SVG line chart with axes, round ticks and a legend; an explanatory note when there is no data."""
    series = [s for s in series if s.points]
    left, right, top, bottom = 60, 16, 34, 44
    inner_w, inner_h = width - left - right, height - top - bottom
    parts = [f'<svg class="chart" id="{esc(chart_id)}" xmlns="http://www.w3.org/2000/svg" width="{width}" '
             f'height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(title)}">',
             f'<text x="{left}" y="20" class="chart-title">{esc(title)}</text>']
    if not series:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" class="muted">no data</text>'
                     "</svg>")
        return "".join(parts)
    xs = [x for s in series for x, _ in s.points]
    ys = [y for s in series for _, y in s.points]
    x_ticks = nice_ticks(min(xs), max(xs))
    y_ticks = nice_ticks(min(ys), max(ys))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * inner_w

    def sy(y: float) -> float:
        return top + inner_h - (y - y0) / ((y1 - y0) or 1) * inner_h

    for tick in y_ticks:
        parts.append(f'<line x1="{left}" x2="{left + inner_w}" y1="{sy(tick):.1f}" y2="{sy(tick):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{sy(tick) + 4:.1f}" text-anchor="end" class="tick">'
                     f"{_tick_label(tick)}</text>")
    for tick in x_ticks:
        parts.append(f'<text x="{sx(tick):.1f}" y="{top + inner_h + 16}" text-anchor="middle" class="tick">'
                     f"{_tick_label(tick)}</text>")
    parts.append(f'<line x1="{left}" x2="{left + inner_w}" y1="{top + inner_h}" y2="{top + inner_h}" class="axis"/>'
                 f'<line x1="{left}" x2="{left}" y1="{top}" y2="{top + inner_h}" class="axis"/>'
                 f'<text x="{left + inner_w / 2}" y="{height - 6}" text-anchor="middle" class="axis-label">'
                 f"{esc(x_label)}</text>"
                 f'<text transform="translate(14 {top + inner_h / 2}) rotate(-90)" text-anchor="middle" '
                 f'class="axis-label">{esc(y_label)}</text>')
    legend_x = left + inner_w - sum(8 * len(s.label) + 24 for s in series)
    for index, s in enumerate(series):
        colour = COLOURS[index % len(COLOURS)]
        points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
        parts.append(f'<polyline class="series" data-label="{esc(s.label)}" fill="none" stroke="{colour}" '
                     f'stroke-width="1.6" points="{points}"/>')
        if s.markers or len(s.points) == 1:
            parts.extend(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{colour}"/>' for x, y in s.points)
        parts.append(f'<rect x="{legend_x}" y="10" width="12" height="3" fill="{colour}"/>'
                     f'<text x="{legend_x + 16}" y="16" class="tick">{esc(s.label)}</text>')
        legend_x += 8 * len(s.label) + 24
    parts.append("</svg>")
    return "".join(parts)


# ---------------------------------------------------------------- inputs


def _points(records: list[dict], key: str) -> list[tuple[float, float]]:
    return [(float(r["step"]), float(r[key])) for r in records
            if isinstance(r.get("step"), (int, float)) and isinstance(r.get(key), (int, float))
            and math.isfinite(r[key])]


def training_summary(records: list[dict]) -> dict[str, float | int | None]:
    """Totals from the training log: steps, tokens, wall time, throughput and peak memory."""
    train = [r for r in records if "loss" in r]
    last = train[-1] if train else {}
    speeds = [r["tokens_per_s"] for r in train if isinstance(r.get("tokens_per_s"), (int, float))]

    def peak(key: str) -> float | None:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        return max(values) if values else None

    # training logs tokens per step and the wall time so far (across resumes)
    counted = [r for r in train if isinstance(r.get("tokens"), (int, float))]
    tokens = sum(r["tokens"] for r in counted) if counted else None
    trained = sum(r.get("trained_tokens") or 0 for r in train) or None
    elapsed = last.get("elapsed_s")
    overall = tokens / elapsed if tokens and elapsed else None
    vals = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))]
    return {
        "steps": last.get("step"),
        "tokens": tokens,
        "trained_tokens": trained,
        "elapsed_s": elapsed,
        "tokens_per_s": overall if overall is not None else (sum(speeds) / len(speeds) if speeds else None),
        "final_loss": last.get("loss"),
        "final_val_loss": vals[-1] if vals else None,
        "best_val_loss": min(vals) if vals else None,
        "peak_rss_gib": peak("peak_rss_gib"),
        "peak_device_gib": peak("peak_device_gib"),
    }


# ---------------------------------------------------------------- sections


def _fmt(value: Any, kind: str = "") -> str:
    if value is None:
        return "—"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    if kind == "int":
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    return esc(value)


def upgrade_comparison(comparison: dict | None) -> dict | None:
    """compare.json as this version writes it: older files named the fine-tuned result ``"tuned"``."""
    if comparison and "fine_tuned" not in comparison and "tuned" in comparison:
        comparison = dict(comparison)
        comparison["fine_tuned"] = comparison.pop("tuned")
    return comparison


def system_columns(comparison: dict) -> list[tuple[str, dict]]:
    """(column name, result) in table order: base, few-shot (when measured), fine-tuned."""
    columns = [("base", comparison.get("base") or {})]
    few = comparison.get("few_shot")
    if few:
        shots = (few.get("shots") or {}).get("shots")
        columns.append((f"{shots}-shot" if shots else "few-shot", few))
    columns.append(("fine-tuned", comparison.get("fine_tuned") or {}))
    return columns


def metrics_html(columns: list[tuple[str, dict]], *, table_id: str, caption: str, change: str = "change") -> str:
    """A table of homebake.metrics.metric_rows (as in the terminal) in HTML; change = last column - first."""
    rows = []
    for row in metric_rows([result for _, result in columns]):
        label = f"field <code>{esc(row.field_name)}</code>" if row.field_name else esc(row.label)
        css = ' class="field"' if row.field_name or row.kind == "info" else ""
        improved = row.improved()
        difference = format_change(row)
        change_css = "muted" if improved is None else "good" if improved else "bad"
        rows.append(f"<tr{css}><th>{label}</th>" + "".join(f"<td>{esc(format_value(v, row.kind))}</td>"
                                                          for v in row.values)
                    + (f'<td><span class="{change_css}">{esc(difference)}</span></td>' if difference
                       else "<td></td>")
                    + "</tr>")
    head = "".join(f"<th>{esc(name)}</th>" for name, _ in columns)
    return (f'<table class="metrics" id="{esc(table_id)}"><caption>{esc(caption)}</caption>'
            f"<thead><tr><th></th>{head}<th>{esc(change)}</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table>")


def before_after_table(comparison: dict) -> str:
    """The before/after table: base, few-shot (when measured) and fine-tuned, the change fine-tuned - base."""
    comparison = upgrade_comparison(comparison)
    columns = system_columns(comparison)
    count = columns[-1][1].get("examples") or columns[0][1].get("examples")
    caption = f"{count} held-out examples" if count else "held-out examples"
    return metrics_html(columns, table_id="before-after", caption=caption,
                        change="change vs base" if len(columns) > 2 else "change")


def verdict_banner(comparison: dict | None) -> str:
    if not comparison or not comparison.get("verdict"):
        return ('<div class="verdict none" id="verdict"><strong>No before/after comparison yet.</strong> '
                "Run <code>homebake compare --model M --adapter RUN --data HELD_OUT.jsonl --out RUN</code> "
                "to add one.</div>")
    verdict = comparison["verdict"]
    label = str(verdict.get("label", ""))
    css = {"improved": "improved", "worse": "worse"}.get(label, "same")
    return (f'<div class="verdict {css}" id="verdict"><strong>Verdict: {esc(label)}.</strong> '
            f"{esc(verdict.get('reason', ''))}</div>")


def _mark(ok: Any) -> str:
    if ok is None:
        return ""
    return '<span class="good">✓</span>' if ok else '<span class="bad">✗</span>'


def samples_table(comparison: dict, limit: int = MAX_SAMPLES) -> str:
    comparison = upgrade_comparison(comparison)
    columns = system_columns(comparison)
    if (comparison.get("gguf") or {}).get("samples"):
        columns.append(("GGUF in llama.cpp", comparison["gguf"]))
    lists = [(name, result.get("samples") or []) for name, result in columns]
    total = max(len(samples) for _, samples in lists)
    rows = []
    for index in range(min(limit, total)):
        picked = [samples[index] if index < len(samples) else {} for _, samples in lists]
        prompt = next((p.get("prompt") for p in reversed(picked) if p.get("prompt")), "")
        reference = next((p.get("reference") for p in reversed(picked) if p.get("reference") is not None), None)
        rows.append("<tr>"
                    f'<td class="text">{esc(prompt)}</td>'
                    f'<td class="text">{esc(reference if reference is not None else "—")}</td>'
                    + "".join(f'<td class="text">{_mark(p.get("exact"))} {esc(p.get("output", ""))}</td>'
                              for p in picked)
                    + "</tr>")
    shown = len(rows)
    note = f"first {shown} of {total}" if total > shown else f"all {total}"
    head = "".join(f"<th>{esc(name)}</th>" for name, _ in lists)
    return (f'<table class="samples" id="samples"><caption>Greedy generations, {note} '
            f"(✓ exact match)</caption><thead><tr><th>prompt</th><th>reference</th>{head}"
            f"</tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _verdict_box(verdict: dict | None, *, box_id: str, title: str, good: tuple[str, ...], bad: tuple[str, ...]) -> str:
    label = str((verdict or {}).get("label", ""))
    css = "improved" if label in good else "worse" if label in bad else "same"
    return (f'<div class="verdict {css}" id="{esc(box_id)}"><strong>{esc(title)}: {esc(label)}.</strong> '
            f"{esc((verdict or {}).get('reason', ''))}</div>")


def _notes_about(comparison: dict, *words: str) -> str:
    notes = [n for n in comparison.get("notes") or [] if any(w in n for w in words)]
    return "".join(f'<p class="muted note">{esc(n)}</p>' for n in notes)


def baselines_section(comparison: dict) -> str:
    """Did fine-tuning beat prompting? The prompting verdict, prompt lengths and the shots used."""
    comparison = upgrade_comparison(comparison)
    few, verdict = comparison.get("few_shot"), comparison.get("prompting_verdict")
    parts = ['<section id="baselines"><h2>Prompting baseline: did fine-tuning beat a few examples in the prompt?</h2>']
    if not few:
        parts.append(_notes_about(comparison, "few-shot") or
                     '<p class="muted">No few-shot baseline measured (homebake compare --shots K).</p>')
        return "".join(parts) + "</section>"
    if verdict:
        parts.append(_verdict_box(verdict, box_id="prompting-verdict", title="Prompting vs fine-tuning",
                                  good=("fine-tuning wins",), bad=("prompting already gets there",)))
    rows = "".join(f"<tr><th>{esc(name)}</th><td>{_fmt(result.get('prompt_tokens_per_request'))}</td>"
                   f"<td>{_fmt((result.get('task') or {}).get('exact_match'), 'pct')}</td></tr>"
                   for name, result in system_columns(comparison))
    parts.append('<table class="metrics" id="prompt-tokens"><caption>What each system costs per request'
                 "</caption><thead><tr><th></th><th>prompt tokens per request</th><th>exact match</th></tr></thead>"
                 f"<tbody>{rows}</tbody></table>")
    setup = few.get("shots") or {}
    shots = setup.get("examples") or []
    if shots:
        items = "".join(
            "<tr>" + f'<td class="text">{esc(source)}</td>' + "".join(
                f'<td class="text"><strong>{esc(turn.get("role"))}:</strong> {esc(turn.get("content"))}</td>'
                for turn in turns[:2]) + "</tr>"
            for source, turns in zip(setup.get("sources") or [""] * len(shots), shots))
        parts.append(f'<table class="samples" id="shots"><caption>The {len(shots)} examples in every few-shot prompt '
                     f"(prior turns after the system prompt; seed {esc(setup.get('seed'))}, drawn from "
                     f"{esc(', '.join(setup.get('data') or []))}; {esc(setup.get('excluded_overlap', 0))} training "
                     "examples left out because they share a user turn with the held-out file)</caption>"
                     "<thead><tr><th>from</th><th>user</th><th>assistant</th></tr></thead>"
                     f"<tbody>{items}</tbody></table>")
    return "".join(parts) + "</section>"


def drift_section(comparison: dict) -> str:
    """What fine-tuning cost elsewhere: KL and kept answers on general instructions, with the level."""
    drift = comparison.get("drift")
    parts = ['<section id="drift"><h2>Drift on general instructions</h2>']
    if not drift:
        parts.append(_notes_about(comparison, "drift") or '<p class="muted">Drift not measured.</p>')
        return "".join(parts) + "</section>"
    level = str(drift.get("level", ""))
    css = {"low": "improved", "high": "worse"}.get(level, "same")
    parts.append(f'<div class="verdict {css}" id="drift-level"><strong>Drift: {esc(level)}.</strong> '
                 f"{esc(drift.get('reason', ''))}</div>")
    t = drift.get("thresholds") or {}
    parts.append('<p class="muted">Mean per-token KL(fine-tuned ‖ base) along the base model\'s own greedy answers, '
                 "and the share of the fine-tuned model's answers that are the same or still contain the base "
                 "answer's key fact (its first number or name not in the instruction, else its longest word). "
                 f"Low: KL &lt; {_fmt(t.get('kl_noticeable'))} and ≥ {_fmt(t.get('kept_noticeable'), 'pct')} kept; "
                 f"high: KL ≥ {_fmt(t.get('kl_high'))} or &lt; {_fmt(t.get('kept_high'), 'pct')} kept; "
                 f"noticeable in between. Set: <code>{esc(drift.get('data', ''))}</code>, answers up to "
                 f"{esc(drift.get('max_new_tokens', ''))} tokens.</p>")
    rows = []
    for item in (drift.get("items") or [])[:MAX_DRIFT_ROWS]:
        rows.append("<tr>"
                    f'<td class="text">{esc(item.get("instruction", ""))}</td>'
                    f'<td class="text">{esc(item.get("base", ""))}</td>'
                    f'<td class="text">{_mark(item.get("kept"))} {esc(item.get("fine_tuned", ""))}</td>'
                    f'<td class="text">{esc(item.get("key_fact") or "—")}</td>'
                    f'<td>{_fmt(item.get("kl"))}</td></tr>')
    total = len(drift.get("items") or [])
    note = f"first {len(rows)} of {total}" if total > len(rows) else f"all {total}"
    parts.append(f'<table class="samples" id="drift-items"><caption>Instructions, {note} (✓ kept)</caption>'
                 "<thead><tr><th>instruction</th><th>base</th><th>fine-tuned</th><th>key fact</th>"
                 f"<th>KL</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")
    return "".join(parts) + "</section>"


def exported_section(comparison: dict) -> str:
    """The exported GGUF scored in llama.cpp, side by side with homebake's merged model."""
    comparison = upgrade_comparison(comparison)
    gguf = comparison.get("gguf")
    parts = ['<section id="exported"><h2>The exported file in llama.cpp</h2>']
    if not gguf:
        parts.append(_notes_about(comparison, "llama", "GGUF") or
                     '<p class="muted">No exported file scored (homebake compare --gguf FILE).</p>')
        return "".join(parts) + "</section>"
    if gguf.get("verdict"):
        parts.append(_verdict_box(gguf["verdict"], box_id="gguf-verdict", title="Exported file", good=("kept",),
                                  bad=("lost",)))
    parts.append(f'<p class="muted">File <code>{esc(gguf.get("file", ""))}</code> run by '
                 f"{esc(gguf.get('runtime', 'llama.cpp'))} with its own chat template and end tokens, greedy, on the "
                 "same held-out examples.</p>")
    columns = [("homebake (merged)", comparison.get("fine_tuned") or {}), ("GGUF in llama.cpp", gguf)]
    parts.append(metrics_html(columns, table_id="gguf-table", caption=f"{gguf.get('examples', '')} held-out examples; "
                              f"same answer as homebake on {gguf.get('same_answers', '—')}"))
    return "".join(parts) + "</section>"


def training_section(records: list[dict]) -> str:
    summary = training_summary(records)
    per_pair = any("reward_accuracy" in r for r in records)  # DPO/ORPO: the loss is per pair
    loss_chart = line_chart("Loss per pair" if per_pair else "Loss per trained token", [
        Series("train", _points(records, "loss")),
        Series("validation", _points(records, "val_loss"), markers=True),
    ], x_label="optimizer step", y_label="loss", chart_id="loss-chart", width=1052, height=320)
    speed_chart = line_chart("Training throughput", [Series("tokens/s", _points(records, "tokens_per_s"))],
                             x_label="optimizer step", y_label="tokens / s", chart_id="throughput-chart",
                             width=520, height=260)
    memory_chart = line_chart("Memory", [Series("RSS", _points(records, "rss_gib")),
                                         Series("device", _points(records, "device_gib"))],
                              x_label="optimizer step", y_label="GiB", chart_id="memory-chart",
                              width=520, height=260)
    rows = [("optimizer steps", _fmt(summary["steps"], "int") if summary["steps"] is not None else "—"),
            ("tokens processed", _fmt(summary["tokens"], "int") if summary["tokens"] is not None else "—"),
            ("trained tokens", _fmt(summary["trained_tokens"], "int") if summary["trained_tokens"] else "—"),
            ("training time", f"{summary['elapsed_s']:.0f} s" if summary["elapsed_s"] else "—"),
            ("throughput", f"{summary['tokens_per_s']:.0f} tokens/s" if summary["tokens_per_s"] else "—"),
            ("final train loss", _fmt(summary["final_loss"])),
            ("final / best validation loss", f"{_fmt(summary['final_val_loss'])} / {_fmt(summary['best_val_loss'])}"),
            ("peak memory (process RSS)", f"{summary['peak_rss_gib']:.2f} GiB" if summary["peak_rss_gib"] else "—")]
    if summary["peak_device_gib"]:
        rows.append(("peak device memory", f"{summary['peak_device_gib']:.2f} GiB"))
    table = "".join(f"<tr><th>{esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    if not records:
        note = '<p class="muted">No metrics.jsonl in this folder (not a training run).</p>'
    else:
        note = ""
    return (f'<section id="training"><h2>Training</h2>{note}<div class="charts">{loss_chart}</div>'
            f'{preference_charts(records)}<div class="charts">{speed_chart}{memory_chart}</div>'
            f'<table class="summary" id="throughput">{table}</table></section>')


def preference_charts(records: list[dict]) -> str:
    """DPO/ORPO runs: reward accuracy and reward margin, train and validation ("" for SFT runs)."""
    if not any("reward_accuracy" in r or "val_reward_accuracy" in r for r in records):
        return ""
    charts = [line_chart(title, [Series("train", _points(records, key)),
                                 Series("validation", _points(records, f"val_{key}"), markers=True)],
                         x_label="optimizer step", y_label=label, chart_id=f"{key.replace('_', '-')}-chart",
                         width=520, height=260)
              for key, title, label in (("reward_accuracy", "Reward accuracy (chosen beats rejected)", "share of pairs"),
                                        ("reward_margin", "Reward margin (chosen − rejected)", "reward"))]
    return f'<div class="charts" id="preference">{"".join(charts)}</div>'


STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;
color:#111827;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #e5e7eb}
.muted{color:#6b7280}.good{color:#047857;font-weight:600}.bad{color:#b91c1c;font-weight:600}
.verdict{padding:12px 16px;border-radius:8px;margin:16px 0;font-size:15px}
.verdict.improved{background:#ecfdf5;border:1px solid #10b981}.verdict.worse{background:#fef2f2;border:1px solid #ef4444}
.verdict.same,.verdict.none{background:#f9fafb;border:1px solid #d1d5db}
table{border-collapse:collapse;margin:8px 0}th,td{padding:4px 10px;border-bottom:1px solid #e5e7eb;text-align:left;
vertical-align:top}caption{text-align:left;color:#6b7280;padding:4px 0}
table.metrics td{text-align:right;font-variant-numeric:tabular-nums}tr.field th{font-weight:normal;padding-left:24px}
table.samples{width:100%;table-layout:fixed}table.samples td.text{font-family:ui-monospace,Menlo,monospace;
font-size:12px;white-space:pre-wrap;word-break:break-word}
pre{background:#f9fafb;border:1px solid #e5e7eb;padding:10px;overflow:auto;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:12px}svg.chart{background:#fff;border:1px solid #e5e7eb;border-radius:6px}
.chart-title{font-size:13px;font-weight:600}.tick{font-size:11px;fill:#4b5563}.axis-label{font-size:12px;fill:#374151}
.grid{stroke:#f3f4f6}.axis{stroke:#9ca3af}code{font-size:12px}
"""


def render_report(*, title: str, config_text: str | None, records: list[dict], comparison: dict | None,
                  paths: dict[str, str] | None = None) -> str:
    """The whole page as a string (pure: all inputs are given)."""
    comparison = upgrade_comparison(comparison)
    subtitle = []
    if comparison:
        for key, label in (("model", "model"), ("adapter", "adapter"), ("data", "held-out data")):
            if comparison.get(key):
                subtitle.append(f"{label}: <code>{esc(comparison[key])}</code>")
    parts = [f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
             f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{STYLE}</style></head><body>',
             f"<h1>{esc(title)}</h1>",
             f'<p class="muted">{" · ".join(subtitle)}</p>' if subtitle else "",
             verdict_banner(comparison)]
    if comparison and (comparison.get("base") or comparison.get("fine_tuned")):
        parts.append(f'<section id="comparison"><h2>Before / after</h2>{before_after_table(comparison)}</section>')
        parts += [baselines_section(comparison), drift_section(comparison), exported_section(comparison)]
    parts.append(training_section(records))
    if comparison and ((comparison.get("base") or {}).get("samples")
                       or (comparison.get("fine_tuned") or {}).get("samples")):
        parts.append(f'<section id="generations"><h2>Samples</h2>{samples_table(comparison)}</section>')
    if paths:
        items = "".join(f"<tr><th>{esc(k)}</th><td><code>{esc(v)}</code></td></tr>" for k, v in paths.items())
        parts.append(f'<section id="outputs"><h2>Outputs</h2><table>{items}</table></section>')
    config_html = f"<pre>{esc(config_text)}</pre>" if config_text else '<p class="muted">No config.yaml found.</p>'
    parts.append(f'<section id="config"><h2>Resolved config</h2>{config_html}</section>')
    parts.append("</body></html>\n")
    return "".join(parts)


def load_comparison(run_dir: Path) -> dict | None:
    """compare.json of the run, unless training wrote metrics after it (a re-run or resume: it is stale)."""
    path = run_dir / COMPARE_FILE
    if not path.is_file():
        return None
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_mtime > path.stat().st_mtime:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError):
        return None
    return data if isinstance(data, dict) else None


def write_report(run_dir: str | Path, *, comparison: dict | None = None, title: str | None = None,
                 paths: dict[str, str] | None = None) -> Path:
    """Write ``run_dir/report.html`` from the folder's files (``comparison`` overrides compare.json)."""
    run_dir = Path(run_dir)
    config_path = run_dir / CONFIG_FILE
    config_text = config_path.read_text(encoding="utf-8") if config_path.is_file() else None
    if comparison is None:
        comparison = load_comparison(run_dir)
    page = render_report(title=title or f"homebake report — {run_dir.resolve().name}", config_text=config_text,
                         records=read_metrics(run_dir / METRICS_FILE), comparison=comparison, paths=paths)
    target = run_dir / REPORT_FILE
    with atomic_file(target, "w", encoding="utf-8") as handle:
        handle.write(page)
    return target
