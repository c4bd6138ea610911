"""The few-shot baseline: shot choice (seeded, never from the evaluated file), prompt construction and rendering,
the run's training data, and `homebake compare` with the baseline on a tiny model."""

import json

import pytest

from homebake.baselines import (TrainingData, choose_shots, few_shot_messages, load_shots, run_training_data,
                                user_turns)
from homebake.data.formats import Conversation

SYSTEM = {"role": "system", "content": "Extract the order as JSON."}


def conversation(user: str, answer: str, *, system: bool = True, source: str = "train.jsonl:1", **extra):
    messages = ([SYSTEM] if system else []) + [{"role": "user", "content": user},
                                               {"role": "assistant", "content": answer}]
    return Conversation(messages, source, "messages", **extra)


def test_shots_never_come_from_the_evaluated_examples():
    training = [conversation(f"order {i}", f"{{\"qty\": {i}}}", source=f"train.jsonl:{i}") for i in range(40)]
    # the evaluated file shares 10 of them, one written with other case and spacing
    evaluated = [c.messages[:-1] for c in training[:9]] + [[SYSTEM, {"role": "user", "content": "  ORDER   9 "}]]
    for seed in range(20):
        shot_set = choose_shots(training, 5, evaluated, seed=seed)
        assert len(shot_set.shots) == 5
        assert not {s.source for s in shot_set.shots} & {f"train.jsonl:{i}" for i in range(10)}
        assert shot_set.eligible == 30 and shot_set.excluded == 10
    # deterministic: the same seed, the same shots in the same order; another seed, another sample
    assert choose_shots(training, 5, evaluated, seed=3).sources == choose_shots(training, 5, evaluated, seed=3).sources
    assert choose_shots(training, 5, evaluated, seed=3).sources != choose_shots(training, 5, evaluated, seed=4).sources


def test_shot_eligibility_and_too_few_candidates():
    tool_call = Conversation([{"role": "user", "content": "weather?"},
                              {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "w"}}]},
                              {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}],
                             "t:1", "messages")
    text = Conversation([], "t:2", "text", text="plain text")
    with_tools = conversation("hi", "hello", tools=[{"type": "function"}], source="t:3")
    good = conversation("a", "b", source="t:4")
    shot_set = choose_shots([tool_call, text, with_tools, good], 5, [])
    assert shot_set.sources == ["t:4"] and shot_set.notes and "only 1" in shot_set.notes[0]
    assert choose_shots([good], 0, []).shots == []


def test_few_shot_prompt_keeps_the_system_prompt_first_and_drops_the_shots_system_prompts():
    shots = [conversation("order one", '{"qty": 1}'), conversation("order two", '{"qty": 2}', system=False)]
    prompt = [SYSTEM, {"role": "user", "content": "order three"}]
    messages = few_shot_messages(shots, prompt)
    assert [(m["role"], m["content"]) for m in messages] == [
        ("system", SYSTEM["content"]), ("user", "order one"), ("assistant", '{"qty": 1}'),
        ("user", "order two"), ("assistant", '{"qty": 2}'), ("user", "order three")]
    assert prompt == [SYSTEM, {"role": "user", "content": "order three"}]  # inputs untouched
    no_system = few_shot_messages(shots[:1], [{"role": "user", "content": "x"}])
    assert [m["role"] for m in no_system] == ["user", "assistant", "user"]


def test_few_shot_prompt_renders_as_prior_turns_with_the_model_template(tiny_model_dir):
    from homebake.model.load import load_model

    tokenizer = load_model(str(tiny_model_dir)).tokenizer
    messages = few_shot_messages([conversation("order one", '{"qty": 1}')],
                                 [SYSTEM, {"role": "user", "content": "order two"}])
    text = tokenizer.render_chat(messages, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nExtract the order as JSON.<|im_end|>\n"
                    "<|im_start|>user\norder one<|im_end|>\n<|im_start|>assistant\n{\"qty\": 1}<|im_end|>\n"
                    "<|im_start|>user\norder two<|im_end|>\n<|im_start|>assistant\n")


def test_load_shots_from_an_overlapping_training_file(extract_dir, tmp_path):
    test_lines = (extract_dir / "test.jsonl").read_text().splitlines()
    train_lines = (extract_dir / "train.jsonl").read_text().splitlines()
    mixed = tmp_path / "train_with_test.jsonl"  # a training file that (wrongly) also holds the held-out examples
    mixed.write_text("\n".join(test_lines + train_lines) + "\n")
    evaluated = [json.loads(line)["messages"] for line in test_lines]
    held_out = set().union(*(user_turns(m) for m in evaluated))
    shot_set = load_shots(TrainingData([str(mixed)]), len(train_lines), evaluated)
    assert shot_set.excluded == len(test_lines) and len(shot_set.shots) == len(train_lines)
    assert not any(user_turns(shot.messages) & held_out for shot in shot_set.shots)
    # the evaluated file as training data: nothing is eligible
    assert load_shots(TrainingData([str(extract_dir / "test.jsonl")]), 5, evaluated).shots == []


def test_run_training_data_reads_config_yaml(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.jsonl").write_text("{}\n")
    (run / "config.yaml").write_text("data:\n  paths: [train.jsonl, hf:owner/name]\n  format: messages\n"
                                     "  roles: {bot: assistant}\n")
    monkeypatch.chdir(tmp_path)
    training = run_training_data(run)
    assert training.paths == [str(run / "train.jsonl"), "hf:owner/name"]  # relative to the run when not here
    assert training.format == "messages" and training.roles == {"bot": "assistant"}
    (run / "config.yaml").write_text("model: x\n")
    assert run_training_data(run) is None
    assert run_training_data(tmp_path / "bare-adapter") is None


def test_compare_measures_the_few_shot_baseline(tiny_model_dir, tiny_run, extract_dir, tmp_path, capsys):
    from homebake.cli import main

    out = tmp_path / "cmp"
    code = main(["compare", "--model", str(tiny_model_dir), "--adapter", str(tiny_run), "--data",
                 str(extract_dir / "test.jsonl"), "--device", "cpu", "--max-new-tokens", "6", "--shots", "2",
                 "--drift-max-new-tokens", "4", "--few-shot-loss", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "2-shot" in printed and "prompt tokens per request" in printed
    assert "prompting vs fine-tuning: " in printed and "drift: " in printed
    record = json.loads((out / "compare.json").read_text())
    assert "tuned" not in record
    metric_keys = set(record["base"])
    assert metric_keys <= set(record["few_shot"]) and metric_keys == set(record["fine_tuned"])
    setup = record["few_shot"]["shots"]
    assert setup["shots"] == 2 and setup["data"] == [str(extract_dir / "train.jsonl")]
    test_users = {json.loads(line)["messages"][1]["content"] for line in (extract_dir / "test.jsonl").open()}
    assert not {turn["content"] for shot in setup["examples"] for turn in shot} & test_users
    # two shots of ~200 tokens each in front of every prompt
    assert record["few_shot"]["prompt_tokens_per_request"] > record["base"]["prompt_tokens_per_request"] + 300
    assert record["few_shot"]["loss"] is not None
    assert record["prompting_verdict"]["label"] in ("fine-tuning wins", "prompting already gets there", "neither")
    assert record["prompting_verdict"]["shots"] == 2
    # the base column is the base model: its numbers equal a compare without the baseline
    main(["compare", "--model", str(tiny_model_dir), "--adapter", str(tiny_run), "--data",
          str(extract_dir / "test.jsonl"), "--device", "cpu", "--max-new-tokens", "6", "--shots", "0",
          "--no-drift", "--json"])
    plain = json.loads(capsys.readouterr().out)
    assert plain["few_shot"] is None and plain["drift"] is None
    assert plain["base"]["loss"] == pytest.approx(record["base"]["loss"], rel=1e-6)
    assert [s["output"] for s in plain["base"]["samples"]] == [s["output"] for s in record["base"]["samples"]]
    assert [s["output"] for s in plain["fine_tuned"]["samples"]] == \
        [s["output"] for s in record["fine_tuned"]["samples"]]


def test_compare_without_training_data_says_why_there_is_no_baseline(tiny_model_dir, tiny_run, extract_dir,
                                                                     tmp_path, capsys):
    import shutil

    from homebake.cli import main

    bare = tmp_path / "bare"  # a PEFT adapter folder without the run's config.yaml
    bare.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tiny_run / name, bare / name)
    args = ["compare", "--model", str(tiny_model_dir), "--adapter", str(bare), "--data",
            str(extract_dir / "test.jsonl"), "--device", "cpu", "--max-new-tokens", "4", "--generate", "2",
            "--drift-data", "none"]
    assert main(args + ["--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["few_shot"] is None and record["prompting_verdict"] is None and record["drift"] is None
    assert any("--shots-data" in note for note in record["notes"])
    # --shots-data pointing at the evaluated file itself: every candidate overlaps, so no baseline, and it says so
    assert main(args + ["--shots-data", str(extract_dir / "test.jsonl"), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["few_shot"] is None
    assert any("no training example" in note and "share a user turn" in note for note in record["notes"])
