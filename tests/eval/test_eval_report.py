"""report.html: self-contained, with its sections and charts; rendered in a real headless Chromium."""

import json
import re
from html.parser import HTMLParser

import pytest

from homebake.report import Series, line_chart, nice_ticks, training_summary, write_report

from chromium import find_chromium, render_page

CONFIG = "model: smollm2-135m-instruct\nmethod: lora\nlearning_rate: 0.0002\ndata:\n  paths: [train.jsonl]\n"


def full_comparison(run) -> dict:
    """compare.json as `homebake compare --gguf` writes it: base, few-shot, fine-tuned, drift and the GGUF."""
    sample = {"prompt": "Order for <Ann>: 2 mugs", "reference": '{"name": "Ann"}'}

    def result(exact, tokens, output, loss):
        return {"examples": 2, "loss": loss, "perplexity": None if loss is None else 2.7 ** loss, "prompt_tokens_per_request": tokens,
                "stopped_share": 1.0,
                "task": {"exact_match": exact, "normalized_match": exact, "valid_json": 1.0,
                         "field_accuracy": exact, "per_field": {"name": exact}},
                "samples": [dict(sample, output=output, exact=exact == 1.0)] * 2}

    return {
        "model": "smollm2-135m-instruct", "adapter": str(run), "data": "test.jsonl",
        "base": result(0.0, 90.0, "Sure! <script>alert(1)</script>", 2.1),
        "few_shot": dict(result(0.5, 612.0, '{"name": "ann lee"}', 1.2),
                         shots={"shots": 5, "seed": 0, "data": ["train.jsonl"], "excluded_overlap": 1,
                                "sources": [f"train.jsonl:{i}" for i in range(5)],
                                "examples": [[{"role": "user", "content": f"order <{i}>"},
                                              {"role": "assistant", "content": f'{{"qty": {i}}}'}]
                                             for i in range(5)]}),
        "fine_tuned": result(1.0, 90.0, '{"name": "Ann"}', 0.3),
        "verdict": {"label": "improved", "reason": "exact match 0.0% -> 100.0% (+100.0 points)"},
        "prompting_verdict": {"label": "fine-tuning wins", "reason": "fine-tuning beat 5-shot prompting by +50.0 "
                              "points: exact match 50.0% with 5 examples in the prompt"},
        "drift": {"level": "low", "mean_kl": 0.031, "kept_share": 0.94, "same_share": 0.8, "instructions": 2,
                  "data": "drift.jsonl", "max_new_tokens": 48, "reason": "KL 0.031 nats/token on the base's answers",
                  "thresholds": {"kl_noticeable": 0.1, "kl_high": 0.5, "kept_noticeable": 0.8, "kept_high": 0.5},
                  "items": [{"instruction": "Capital of France?", "base": "Paris.", "fine_tuned": "It is Paris.",
                             "key_fact": "Paris", "kept": True, "same": False, "kl": 0.02},
                            {"instruction": "2+2?", "base": "4", "fine_tuned": "<b>5</b>", "key_fact": "4",
                             "kept": False, "same": False, "kl": 0.05}]},
        "gguf": dict(result(1.0, 90.0, '{"name": "Ann"}', None), file="run/gguf/run-Q8_0.gguf",
                     runtime="llama.cpp (llama-cpp-python 0.3.16)", same_answers=2,
                     verdict={"label": "kept", "reason": "exact match 100.0% in homebake -> 100.0% in llama.cpp"}),
        "notes": [],
    }


def make_run(tmp_path, *, with_comparison=True, full=False):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(CONFIG)
    lines = []
    for step in range(1, 21):
        lines.append({"step": step, "loss": 3.0 / step ** 0.5, "lr": 2e-4, "tokens_per_s": 400 + step,
                      "tokens": 1000, "trained_tokens": 300, "elapsed_s": 2.5 * step,
                      "rss_gib": 1.0 + step / 100, "peak_rss_gib": 1.2 + step / 100})
        if step % 5 == 0:
            lines.append({"step": step, "val_loss": 2.5 / step ** 0.4})
    (run / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if with_comparison:
        sample = {"prompt": "Order for <Ann>: 2 mugs", "reference": '{"name": "Ann"}'}
        comparison = {
            "model": "smollm2-135m-instruct", "adapter": str(run), "data": "test.jsonl",
            "base": {"examples": 2, "loss": 2.1, "perplexity": 8.17,
                     "task": {"exact_match": 0.0, "normalized_match": 0.0, "valid_json": 0.5,
                              "field_accuracy": 0.25, "per_field": {"name": 0.25}},
                     "samples": [dict(sample, output="Sure! <script>alert(1)</script>", exact=False)] * 2},
            "tuned": {"examples": 2, "loss": 0.3, "perplexity": 1.35,
                      "task": {"exact_match": 1.0, "normalized_match": 1.0, "valid_json": 1.0,
                               "field_accuracy": 1.0, "per_field": {"name": 1.0}},
                      "samples": [dict(sample, output='{"name": "Ann"}', exact=True)] * 2},
            "verdict": {"label": "improved", "reason": "exact match 0.0% -> 100.0% (+100.0 points)"},
        }  # the layout of an older compare.json: the fine-tuned result under "tuned", nothing else measured
        (run / "compare.json").write_text(json.dumps(full_comparison(run) if full else comparison))
    return run


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.urls, self.ids = [], [], set()

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)
            if name == "id":
                self.ids.add(value)


def test_nice_ticks_cover_the_range_with_round_steps():
    ticks = nice_ticks(0.37, 2.9)
    assert ticks[0] <= 0.37 and ticks[-1] >= 2.9
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert steps == {1.0} and ticks == [0, 1, 2, 3]  # 2.53 / 5 targets 0.506: the next round step is 1
    assert nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert nice_ticks(5, 5)[0] <= 5 <= nice_ticks(5, 5)[-1]  # a flat series still gets an axis


def test_line_chart_maps_extremes_to_the_plot_corners():
    svg = line_chart("t", [Series("a", [(0, 0), (10, 1)])], x_label="x", y_label="y", width=200, height=100)
    points = re.search(r'points="([^"]+)"', svg).group(1).split()
    (x0, y0), (x1, y1) = [tuple(map(float, p.split(","))) for p in points]
    assert x0 == 60 and x1 == 200 - 16  # left and right margins
    assert y0 == 100 - 44 and y1 == 34  # y grows upwards: the low value sits at the bottom
    assert "no data" in line_chart("t", [Series("a", [])], x_label="x", y_label="y")


def test_training_summary_from_metrics():
    records = [{"step": 0, "val_loss": 2.2},  # the untrained model, before step 1
               {"step": 1, "loss": 2.0, "tokens": 100, "elapsed_s": 1.0, "peak_rss_gib": 1.5, "trained_tokens": 30},
               {"step": 1, "val_loss": 1.9},
               {"step": 2, "loss": 1.0, "tokens": 200, "elapsed_s": 2.0, "peak_rss_gib": 2.5, "trained_tokens": 60},
               {"step": 2, "val_loss": 1.7}]
    summary = training_summary(records)  # tokens are per step, elapsed_s is the run's wall time so far
    assert summary["steps"] == 2 and summary["tokens"] == 300 and summary["trained_tokens"] == 90
    assert summary["tokens_per_s"] == 150
    assert summary["peak_rss_gib"] == 2.5
    assert summary["final_val_loss"] == 1.7 and summary["best_val_loss"] == 1.7
    assert summary["final_loss"] == 1.0


def test_report_is_self_contained_and_has_every_section(tmp_path):
    run = make_run(tmp_path)
    page = write_report(run).read_text()
    parsed = _Collect()
    parsed.feed(page)
    assert "script" not in parsed.tags  # no JS; the sample's <script> text is escaped
    assert "&lt;script&gt;" in page and "&lt;Ann&gt;" in page
    assert not [u for u in parsed.urls if re.match(r"(https?:)?//", u)]  # nothing loaded from elsewhere
    assert {"verdict", "before-after", "loss-chart", "throughput-chart", "memory-chart", "throughput",
            "samples", "config"} <= parsed.ids
    assert "Verdict: improved" in page
    assert "learning_rate: 0.0002" in page  # the resolved config
    assert "+100.0 pts" in page
    assert "<td>20,000</td>" in page and "400 tokens/s" in page  # 20 steps x 1,000 tokens in 50 s
    assert page.count('data-label="train"') == 1 and page.count('data-label="validation"') == 1
    assert not list(run.glob(".report.html.*"))  # written atomically, no temporary left behind


def test_report_sections_for_baselines_drift_and_the_exported_file(tmp_path):
    run = make_run(tmp_path, full=True)
    page = write_report(run).read_text()
    parsed = _Collect()
    parsed.feed(page)
    assert "script" not in parsed.tags and "&lt;b&gt;5&lt;/b&gt;" in page and "&lt;0&gt;" in page
    assert {"before-after", "baselines", "prompting-verdict", "prompt-tokens", "shots", "drift", "drift-level",
            "drift-items", "exported", "gguf-verdict", "gguf-table", "samples"} <= parsed.ids
    before_after = page[page.index('id="before-after"'):page.index("</table>", page.index('id="before-after"'))]
    assert "<th>base</th><th>5-shot</th><th>fine-tuned</th><th>change vs base</th>" in before_after
    assert "prompt tokens per request" in before_after and "<td>612.0</td>" in before_after
    assert "Prompting vs fine-tuning: fine-tuning wins." in page
    assert "Drift: low." in page and "KL &lt; 0.1" in page and "0.031 nats/token" in page
    assert "Exported file: kept." in page and "run/gguf/run-Q8_0.gguf" in page
    assert "<th>homebake (merged)</th><th>GGUF in llama.cpp</th>" in page
    assert "<th>GGUF in llama.cpp</th></tr></thead>" in page  # the samples table has the GGUF's answers too


def test_an_old_compare_json_with_tuned_still_reads(tmp_path):
    run = make_run(tmp_path)  # the "tuned" layout
    assert "tuned" in json.loads((run / "compare.json").read_text())
    page = write_report(run).read_text()
    assert "<th>base</th><th>fine-tuned</th><th>change</th>" in page and "+100.0 pts" in page
    assert "No few-shot baseline measured" in page and "Drift not measured" in page
    assert "No exported file scored" in page


def test_sections_say_why_something_was_not_measured(tmp_path):
    run = make_run(tmp_path, full=True)
    comparison = json.loads((run / "compare.json").read_text())
    comparison.update(few_shot=None, prompting_verdict=None, drift=None, gguf=None,
                      notes=["few-shot baseline skipped: pass --shots-data TRAIN.jsonl",
                             "llama-cpp-python is not installed, so the GGUF was not scored in llama.cpp; to "
                             "score it: pip install \"homebake[llamacpp]\""])
    page = write_report(run, comparison=comparison).read_text()
    assert "pass --shots-data TRAIN.jsonl" in page and "homebake[llamacpp]" in page


def test_a_comparison_older_than_the_training_log_is_not_shown(tmp_path):
    import os

    run = make_run(tmp_path)
    stamp = (run / "compare.json").stat().st_mtime
    os.utime(run / "metrics.jsonl", (stamp + 10, stamp + 10))  # training ran again after the comparison
    page = write_report(run).read_text()
    assert "No before/after comparison yet" in page and "Verdict: improved" not in page


def test_report_without_comparison_says_how_to_get_one(tmp_path):
    run = make_run(tmp_path, with_comparison=False)
    page = write_report(run).read_text()
    assert "No before/after comparison yet" in page and "homebake compare" in page
    assert 'id="loss-chart"' in page


def test_report_renders_in_headless_chromium(tmp_path):
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not installed (scripts/setup.sh test installs it where apt-get is available)")
    run = make_run(tmp_path, full=True)
    report = write_report(run)
    result = render_page(binary, report, tmp_path / "report.png", {
        "sections": "['baselines', 'drift', 'exported'].map(id => document.getElementById(id).offsetHeight)",
        "drift_rows": "document.querySelectorAll('#drift-items tbody tr').length",
        "columns": "document.querySelectorAll('#before-after thead th').length",
        "charts": "document.querySelectorAll('svg.chart').length",
        "drawn": "[...document.querySelectorAll('svg.chart polyline')].map(p => p.getBBox().width)",
        "chart_sizes": "[...document.querySelectorAll('svg.chart')].map(s => s.getBoundingClientRect().width)",
        "verdict": "document.getElementById('verdict').innerText",
        "sample_rows": "document.querySelectorAll('#samples tbody tr').length",
        "scripts": "document.scripts.length",
    })
    assert result.console_errors == []
    assert all(url.startswith("file://") for url in result.requests), result.requests
    assert result.values["charts"] == 3
    assert len(result.values["drawn"]) == 4 and all(w > 100 for w in result.values["drawn"])  # lines drawn
    assert all(w > 300 for w in result.values["chart_sizes"])
    assert result.values["verdict"].startswith("Verdict: improved")
    assert result.values["sample_rows"] == 2
    assert result.values["scripts"] == 0
    assert all(height > 50 for height in result.values["sections"])  # the three sections are laid out
    assert result.values["drift_rows"] == 2 and result.values["columns"] == 5
    png = result.screenshot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_chromium_check_catches_a_broken_page(tmp_path):
    """The browser check can fail: a page that loads a CDN script and throws is reported."""
    binary = find_chromium()
    if binary is None:
        pytest.skip("chromium not installed")
    page = tmp_path / "bad.html"
    page.write_text('<html><body><script src="https://cdn.invalid/lib.js"></script>'
                    "<script>console.error('boom'); undefinedFunction();</script></body></html>")
    result = render_page(binary, page, tmp_path / "bad.png", {})
    assert any("boom" in e for e in result.console_errors)
    assert any("undefinedFunction" in e for e in result.console_errors)
    assert any(url.startswith("https://cdn.invalid") for url in result.requests)
