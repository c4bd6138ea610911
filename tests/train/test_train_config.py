"""Training config: defaults < YAML file < CLI flags; errors name the setting; the saved config round-trips."""

import pytest
import yaml

from homebake.cli import build_parser
from homebake.errors import ConfigError
from homebake.train.config import TrainConfig, read_yaml, resolve_config


def parse(*argv):
    return build_parser().parse_args(["train", *argv])


def test_flags_override_file_which_overrides_defaults(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("method: dora\nmax_steps: 7\nlearning_rate: 1e-3\n"
                   "data: {paths: [a.jsonl], max_seq_len: 64}\nlora: {r: 4, target_modules: [q_proj]}\n")
    config = resolve_config(parse(str(cfg), "--max-steps", "9", "--lora-alpha", "8", "--max-seq-len", "32"))
    assert config.max_steps == 9  # flag beats file
    assert config.method == "dora" and config.lora.use_dora  # file beats default; dora implies use_dora
    assert config.learning_rate == pytest.approx(1e-3)
    assert config.data.paths == ["a.jsonl"] and config.data.max_seq_len == 32
    assert config.lora.r == 4 and config.lora.alpha == 8 and config.lora.target_modules == ["q_proj"]
    assert config.batch_size == TrainConfig().batch_size  # untouched default


def test_issue_flags_and_shorthands():
    config = resolve_config(parse("--data", "d.jsonl", "--method", "full", "--out", "o", "--max-steps", "3",
                                  "--no-packing", "--lora-target-modules", "all-linear", "--data-seed", "5"))
    assert (config.model, config.data.paths, config.out, config.max_steps) == (None, ["d.jsonl"], "o", 3)
    assert config.data.packing is False and config.data.seed == 5
    assert config.resolved_learning_rate() == pytest.approx(2e-5)


@pytest.mark.parametrize("text, needle", [
    ("bogus: 1\n", "bogus"),
    ("lora: {rank: 4}\n", "rank"),
    ("method: sft\n", "method"),
    ("batch_size: 0\n", "batch_size"),
    ("lora: {r: 0}\n", "lora.r"),
    ("data: {max_seq_len: 1}\n", "data.max_seq_len"),
    ("method: [oops\n", "invalid YAML"),
    ("batch_size: lots\n", "batch_size"),
])
def test_bad_settings_are_one_line_errors_naming_the_setting(tmp_path, text, needle):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve_config(parse(str(cfg)))
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_saved_config_is_the_base_of_a_resume(tmp_path):
    out = tmp_path / "run"
    first = resolve_config(parse("--data", "x.jsonl", "--out", str(out), "--lora-r", "4", "--max-steps", "10"))
    first.save(out)
    saved = read_yaml(out / "config.yaml")
    assert saved["lora"]["r"] == 4 and saved["learning_rate"] == pytest.approx(2e-4)
    assert "resume" not in saved and yaml.safe_load((out / "config.yaml").read_text()) == saved
    resumed = resolve_config(parse("--out", str(out), "--resume", "--max-steps", "12"))
    assert resumed.resume and resumed.data.paths == ["x.jsonl"] and resumed.lora.r == 4
    assert resumed.max_steps == 12


# --- rough edges a new user meets (issue 15) ---------------------------------------------------------

def help_text():
    return build_parser()._subparsers._group_actions[0].choices["train"].format_help()


def test_help_prints_the_percent_sign_not_a_python_dict():
    text = help_text()
    assert "~30% slower" in " ".join(text.split())
    assert "{'option_strings'" not in text and "'dest':" not in text


def test_choice_flags_show_their_choices():
    text = help_text()
    for shown in ("--method {lora,dora,qlora,full}", "--precision {auto,bf16,fp32}",
                  "--schedule {constant,linear,cosine}", "--train-on {all_assistant,last_turn,everything}",
                  "--truncation {drop,truncate}", "--lora-init {kaiming,gaussian}"):
        assert shown in text
    assert " STR" not in text  # paths and names are shown by their meaning (--out OUT)


def test_a_bad_choice_flag_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        parse("--method", "sft")
    assert "invalid choice: 'sft'" in capsys.readouterr().err


@pytest.mark.parametrize("text, where, suggestion", [
    ("learning_rat: 1e-3\n", "run.yaml", "did you mean `learning_rate`?"),
    ("lora: {alpah: 8}\n", "run.yaml lora", "did you mean `alpha`?"),
    ("data: {max_seq_length: 64}\n", "run.yaml data", "did you mean `max_seq_len`?"),
    ("max_seq_len: 64\n", "run.yaml", "`max_seq_len` is a `data:` setting"),
    ("frobnicate: 1\n", "run.yaml", "homebake train --help"),
])
def test_an_unknown_setting_suggests_the_nearest_one(tmp_path, text, where, suggestion):
    cfg = tmp_path / "run.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        resolve_config(parse(str(cfg)))
    message = str(info.value)
    assert suggestion in message and where in message
    assert len(message) < 200 and "\n" not in message  # not a list of all ~40 settings
