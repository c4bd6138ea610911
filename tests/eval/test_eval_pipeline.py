"""Evaluation, compare, --adapter and the demo pipeline on a tiny random model (a few training steps)."""

import json
import subprocess
import sys

import gguf
import pytest
import torch
from chromium import find_chromium, render_page

from homebake import gguf_eval
from homebake.cli import main
from homebake.demo import DemoSettings, run_demo, summary_lines
from homebake.evaluate import EvalOptions, dataset_loss, evaluate_model, load_eval_data
from homebake.generate import SamplingConfig, generate_ids, greedy_batch
from homebake.sources import open_model
from homebake.model.load import load_model


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir))
    loaded.model.eval()
    return loaded


def test_batched_greedy_equals_one_prompt_at_a_time(tiny):
    tokenizer = tiny.tokenizer
    prompts = [tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
               for text in ("hi", "a much longer prompt than the others", "3+4", "x")]
    assert len({len(p) for p in prompts}) == 4  # really different lengths: left padding is exercised
    batched = greedy_batch(tiny.model, prompts, 12, stop_ids=(), pad_token_id=tokenizer.pad_token_id)
    alone = [list(generate_ids(tiny.model, p, SamplingConfig(temperature=0, max_new_tokens=12))) for p in prompts]
    assert batched == alone
    assert all(len(ids) == 12 for ids in batched)


def test_batched_greedy_stops_each_row_at_its_own_end_token(tiny):
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12]]
    free = greedy_batch(tiny.model, prompts, 8, stop_ids=(), pad_token_id=tiny.tokenizer.pad_token_id)
    stop = free[0][2]  # the third token of the first row ends that row there
    stopped = greedy_batch(tiny.model, prompts, 8, stop_ids={stop}, pad_token_id=tiny.tokenizer.pad_token_id)
    assert stopped[0] == free[0][:free[0].index(stop)]
    expected_second = free[1][:free[1].index(stop)] if stop in free[1] else free[1]
    assert stopped[1] == expected_second


def _alone(model, prompt, steps, stop):
    return list(generate_ids(model, prompt, SamplingConfig(temperature=0, max_new_tokens=steps), stop_ids=stop))


def _batch_sizes(model):
    """Record the batch size of every forward pass (to see finished rows leave the batch)."""
    sizes = []
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: sizes.append(args[0].shape[0]),
                                             with_kwargs=True)
    return sizes, handle


@pytest.mark.parametrize("shared", [False, True], ids=["left-padded", "shared-prefix"])
def test_rows_that_stop_leave_the_batch_with_the_tokens_of_each_prompt_alone(tiny, shared):
    tokenizer = tiny.tokenizer
    head = tokenizer.encode_chat([{"role": "system", "content": "answer in one word"}, {"role": "user", "content": ""}],
                                 add_generation_prompt=False)[:12] if shared else []
    prompts = [head + tokenizer.encode(text) for text in ("hi", "a much longer prompt than the others", "3+4", "xy z")]
    assert len({len(p) for p in prompts}) == 4
    from homebake.generate import shared_prefix

    assert (shared_prefix(tiny.model, prompts) >= 8) == shared
    steps = 10
    free = [_alone(tiny.model, p, steps, ()) for p in prompts]
    # the stop ids (one or two of the tokens generated) that end the rows at the most different steps
    candidates = sorted({t for row in free for t in row})
    stop = max(({a, b} for a in candidates for b in candidates),
               key=lambda ids: len({next((i for i, t in enumerate(row) if t in ids), steps) for row in free}))
    alone = [_alone(tiny.model, p, steps, stop) for p in prompts]
    assert len({len(a) for a in alone}) >= 3 and min(len(a) for a in alone) < steps
    sizes, handle = _batch_sizes(tiny.model)
    try:
        batched = greedy_batch(tiny.model, prompts, steps, stop_ids=stop, pad_token_id=tokenizer.pad_token_id)
    finally:
        handle.remove()
    assert batched == alone
    decode_sizes = sizes[2:] if shared else sizes[1:]  # after the prefix and prompt passes
    assert decode_sizes == sorted(decode_sizes, reverse=True) and decode_sizes[-1] < len(prompts)


def test_a_shared_prefix_is_not_used_with_a_sliding_window(tiny, tiny_model_dir, tmp_path):
    import shutil

    from tiny_models import save_tiny_hf_model

    from homebake.generate import shared_prefix

    save_tiny_hf_model(tmp_path, "mistral_window", vocab_size=tiny.args.vocab_size)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    loaded = load_model(str(tmp_path))
    prompts = [list(range(3, 15)) + [20, 21], list(range(3, 15)) + [30]]
    assert shared_prefix(loaded.model, prompts) == 0
    assert greedy_batch(loaded.model, prompts, 6, (), 0) == [_alone(loaded.model, p, 6, ()) for p in prompts]


@pytest.mark.parametrize("native", [True, False])
def test_inference_on_the_cpu_stays_fp32_even_with_native_bf16(monkeypatch, native):
    from homebake import device
    from homebake.sources import inference_placement

    # bf16 changed greedy answers on the demo's held-out set (docs/eval.md): eval scores the fp32 weights
    monkeypatch.setattr(device, "has_fast_bf16", lambda _device="cpu": native)
    assert inference_placement("cpu") == (torch.device("cpu"), torch.float32)
    assert inference_placement("cpu", "bf16")[1] == torch.bfloat16  # an explicit --dtype wins


def test_evaluate_answers_are_each_prompt_decoded_alone(tiny, extract_dir):
    from homebake.evaluate import answered_examples, prompt_ids

    options = EvalOptions(max_new_tokens=12, generation_batch=4)
    data = load_eval_data(str(extract_dir / "test.jsonl"), tiny.tokenizer, options)
    result = evaluate_model(tiny.model, tiny.tokenizer, data, options)
    stop = tiny.tokenizer.end_token_ids
    expected = [tiny.tokenizer.decode(_alone(tiny.model, prompt_ids(tiny.tokenizer, e), 12, stop),
                                      skip_special_tokens=True).strip() for e in answered_examples(data, options)]
    assert [s["output"] for s in result.samples] == expected


def test_dataset_loss_equals_training_validation_loss(tiny, extract_dir):
    from homebake.train.data_stream import evaluation_batches
    from homebake.train.step import StepRunner

    data = load_eval_data(str(extract_dir / "valid.jsonl"), tiny.tokenizer, EvalOptions())
    assert all(e.reference is not None and e.reference.startswith('{"name"') for e in data.examples)
    result = dataset_loss(tiny.model, data.examples, pad_token_id=tiny.tokenizer.pad_token_id, max_seq_len=1024,
                          batch_size=2)
    encoded = [e.encoded for e in data.examples]
    runner = StepRunner(tiny.model, tiny.model.head_weight, torch.float32, torch.device("cpu"), None)
    reference = runner.evaluate(evaluation_batches(encoded, batch_size=1, max_seq_len=1024,
                                                   pad_token_id=tiny.tokenizer.pad_token_id, packing=False))
    assert result.loss == pytest.approx(reference, rel=1e-5)
    assert result.tokens == sum(e.num_trained for e in encoded)
    # per-example losses (computed packed) equal each example scored alone
    for example, loss in zip(data.examples, result.per_example):
        alone = runner.evaluate(evaluation_batches([example.encoded], batch_size=1, max_seq_len=1024,
                                                   pad_token_id=tiny.tokenizer.pad_token_id, packing=False))
        assert loss == pytest.approx(alone, rel=1e-5)


def test_evaluate_scores_answers_against_references(tiny, extract_dir):
    data = load_eval_data(str(extract_dir / "test.jsonl"), tiny.tokenizer, EvalOptions())
    # a fake "model answer" for the scoring path: the references themselves score 100%
    result = evaluate_model(tiny.model, tiny.tokenizer, data, EvalOptions(generate=2, max_new_tokens=4))
    assert result.task.count == 2 and len(result.samples) == 2
    assert all(s["prompt"] and s["reference"] for s in result.samples)
    assert all(s["output"] == tiny.tokenizer.decode(tiny.tokenizer.encode(s["output"])) for s in result.samples)
    assert result.loss is not None and result.perplexity == pytest.approx(torch.tensor(result.loss).exp().item())


def test_compare_writes_json_and_report_into_the_run(tiny_model_dir, tiny_run, extract_dir, capsys):
    code = main(["compare", "--model", str(tiny_model_dir), "--adapter", str(tiny_run),
                 "--data", str(extract_dir / "test.jsonl"), "--device", "cpu", "--max-new-tokens", "8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "verdict:" in printed and "exact match" in printed and "fine-tuned" in printed
    record = json.loads((tiny_run / "compare.json").read_text())
    assert record["verdict"]["label"] in ("improved", "no change", "worse")
    assert record["base"]["examples"] == record["fine_tuned"]["examples"] == 6
    assert record["base"]["loss"] != record["fine_tuned"]["loss"]  # the adapter really was applied
    page = (tiny_run / "report.html").read_text()
    assert "Verdict:" in page and 'id="loss-chart"' in page and 'id="samples"' in page
    # the tuned numbers equal `homebake eval --adapter`, the base numbers `homebake eval` without it
    main(["eval", "--model", str(tiny_model_dir), "--adapter", str(tiny_run), "--data",
          str(extract_dir / "test.jsonl"), "--device", "cpu", "--max-new-tokens", "8", "--json"])
    tuned = json.loads(capsys.readouterr().out)
    assert tuned["loss"] == pytest.approx(record["fine_tuned"]["loss"], rel=1e-6)
    assert [s["output"] for s in tuned["samples"]] == [s["output"] for s in record["fine_tuned"]["samples"]]


def test_generate_with_adapter_uses_the_merged_weights(tiny_model_dir, tiny_run):
    prompt = "Order for Ann Lee: 2 red mugs"
    proc = subprocess.run([sys.executable, "-m", "homebake.cli", "generate", "--model", str(tiny_model_dir),
                           "--adapter", str(tiny_run), "--prompt", prompt, "--temperature", "0",
                           "--max-new-tokens", "10", "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    subject = open_model(str(tiny_model_dir), str(tiny_run), device="cpu", dtype="fp32")
    subject.use_tuned()
    tokenizer = subject.loaded.tokenizer
    ids = tokenizer.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
    expected = greedy_batch(subject.loaded.model, [ids], 10, tokenizer.end_token_ids, tokenizer.pad_token_id)[0]
    assert proc.stdout.rstrip("\n") == tokenizer.decode(expected)


def test_compare_with_a_missing_adapter_is_a_one_line_error(tiny_model_dir, extract_dir, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "homebake.cli", "compare", "--model", str(tiny_model_dir),
                           "--adapter", str(tmp_path / "nope"), "--data", str(extract_dir / "test.jsonl")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(tmp_path / "nope") in lines[0]


def test_demo_at_tiny_scale_produces_every_artefact(tiny_model_dir, extract_dir, tmp_path):
    out = tmp_path / "demo"
    settings = DemoSettings(model=str(tiny_model_dir), data_dir=extract_dir, out=out, max_steps=3, batch_size=4,
                            learning_rate=1e-2, lora_r=4, lora_alpha=8, eval_every=2, device="cpu", quant="Q8_0",
                            max_seq_len=512, progress=False, trainer_overrides={"precision": "fp32"})
    messages = []
    demo = run_demo(settings, say=messages.append)
    for name in ("adapter_config.json", "adapter_model.safetensors", "config.yaml", "metrics.jsonl",
                 "compare.json", "report.html"):
        assert (out / name).is_file(), name
    reader = gguf.GGUFReader(demo.gguf)  # a real GGUF the gguf package reads
    assert reader.fields["general.architecture"].contents() == "llama"
    record = json.loads((out / "compare.json").read_text())
    assert record["data"] == str(extract_dir / "test.jsonl")  # evaluated on the held-out split
    assert record["base"]["task"]["count"] == 6
    scored = gguf_eval.available()  # the GGUF is scored in llama.cpp when llama-cpp-python is installed
    assert set(record["timings_s"]) == {"train", "evaluate", "export", "total"} | ({"gguf"} if scored else set())
    assert record["few_shot"]["shots"]["shots"] == 5 and record["prompting_verdict"] is not None
    assert record["few_shot"]["loss"] is None  # not scored by default: it costs as much again as answering
    assert record["drift"]["instructions"] == 50 and record["drift"]["level"] in ("low", "noticeable", "high")
    if scored:
        assert record["gguf"]["task"]["count"] == 6 and record["gguf"]["verdict"]["label"] in ("kept", "lost")
    else:
        assert record["gguf"] is None and any("llama-cpp-python" in note for note in record["notes"])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in m for m in metrics) and max(m["step"] for m in metrics) == 3
    page = demo.report.read_text()
    assert str(demo.gguf) in page and "Verdict:" in page
    assert 'id="baselines"' in page and 'id="drift-level"' in page and 'id="exported"' in page
    binary = find_chromium()
    if binary is not None:  # the real report renders cleanly too
        shown = render_page(binary, demo.report, tmp_path / "demo-report.png",
                            {"charts": "document.querySelectorAll('svg.chart polyline').length"})
        assert shown.console_errors == [] and shown.values["charts"] >= 3
    lines = summary_lines(demo, settings.model)
    assert lines[0].startswith("verdict: ") and any("homebake chat" in line for line in lines)
    assert any(line.startswith("  held-out (base / 5-shot / fine-tuned): exact match ") for line in lines)
    assert any(line.startswith("  prompting vs fine-tuning: ") for line in lines)
    assert any(line.startswith("  drift: ") for line in lines)
    assert any(m.startswith("[5/5]") for m in messages)
    with pytest.raises(Exception, match="already exists"):
        run_demo(settings, say=messages.append)  # a second run never clobbers the first without --overwrite


def test_demo_never_trains_on_the_held_out_split():
    from homebake.demo import DATA_DIR

    def messages(split):
        return {json.loads(line)["messages"][1]["content"] for line in (DATA_DIR / f"{split}.jsonl").open()}

    test, train, valid = messages("test"), messages("train"), messages("valid")
    assert len(test) == 50 and not test & train and not test & valid
    proc = subprocess.run([sys.executable, str(DATA_DIR / "make_dataset.py"), "--check"], capture_output=True)
    assert proc.returncode == 0, proc.stderr  # the committed files are what the committed generator makes
