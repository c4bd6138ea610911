"""Auto-fit (train.fit): unset batch size and checkpointing are chosen so the memory plan fits the budget,
explicit settings are kept, and a run that cannot fit is refused before it starts, naming what would fit."""

import subprocess
import sys

import pytest

from homebake.errors import ConfigError
from homebake.train.config import TrainConfig
from homebake.train.fit import fit_to_memory, memory_budget, parse_memory
from homebake.train.plan import GIB, MemoryPlan


def plan_of(rows: int, checkpointing: bool) -> MemoryPlan:
    """A plan whose activations grow with the rows; checkpointing keeps a tenth of them."""
    activations = rows * GIB // (10 if checkpointing else 1)
    return MemoryPlan(GIB, 0, 0, 0, activations, 0)


def fitted(budget_gib: float, **settings):
    config = TrainConfig(**settings)
    reason = fit_to_memory(config, plan_of, int(budget_gib * GIB), "the test budget")
    return (config.batch_size, config.grad_accum, config.gradient_checkpointing), reason


def test_a_run_that_fits_keeps_the_default_batch_without_checkpointing():
    assert fitted(20)[0] == (8, 1, False)


def test_fewer_rows_per_micro_batch_keep_the_rows_per_step_through_accumulation():
    (rows, accum, checkpointing), reason = fitted(4)
    assert (rows, accum, checkpointing) == (2, 4, False)
    assert "8 rows would need 9.00 GiB" in reason


def test_checkpointing_is_turned_on_only_when_nothing_fits_without_it():
    assert fitted(1.5)[0] == (4, 2, True)


def test_explicit_settings_are_kept_and_accumulation_is_not_touched():
    assert fitted(20, batch_size=2, grad_accum=3)[0] == (2, 3, False)
    assert fitted(4, batch_size=3)[0] == (3, 1, False)
    assert fitted(3, batch_size=4)[0] == (4, 1, True)  # checkpointing was left unset


def test_explicit_settings_that_cannot_fit_are_refused_naming_what_would():
    with pytest.raises(ConfigError) as caught:
        fitted(3, batch_size=4, gradient_checkpointing=False)
    message = str(caught.value)
    assert "needs at least 5.00 GiB" in message and "the test budget" in message
    assert "--batch-size 1 --gradient-checkpointing fits" in message
    assert "--batch-size" in message and "--no-gradient-checkpointing" in message


def test_nothing_fits_names_the_other_ways_out():
    with pytest.raises(ConfigError) as caught:
        fitted(0.5)
    assert "--method qlora" in str(caught.value) and "--max-seq-len" in str(caught.value)


@pytest.mark.parametrize("text,gib", [("12GB", 12), ("12 GiB", 12), ("1.5g", 1.5), ("800MB", 800 / 1024),
                                      ("2T", 2048)])
def test_memory_sizes_read_in_binary_units(text, gib):
    assert parse_memory(text) == int(gib * GIB)


@pytest.mark.parametrize("text", ["", "twelve", "-1GB", "0", "12 parsecs"])
def test_unreadable_memory_sizes_are_refused(text):
    with pytest.raises(ConfigError, match="amount of memory"):
        parse_memory(text)


def test_the_budget_is_85_percent_of_the_available_memory_unless_limited():
    assert memory_budget(None, 10 * GIB)[0] == int(8.5 * GIB)
    assert memory_budget("4GB", 10 * GIB) == (4 * GIB, "the --memory-limit of 4GB (4.00 GiB)")


def test_a_run_that_cannot_fit_its_memory_limit_is_refused_in_one_line(tiny_model_dir, tiny_data, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "homebake", "train", "--model", str(tiny_model_dir), "--data",
                           str(tiny_data), "--out", str(out), "--memory-limit", "50MB", "--no-progress"],
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line]
    assert len(errors) == 1 and "more than the --memory-limit of 50MB" in errors[0], proc.stderr
    assert not (out / "config.yaml").exists()  # refused before anything was written


def test_a_run_that_cannot_fit_is_refused_before_its_weights_are_read(tiny_model_dir, tiny_data, tmp_path,
                                                                       monkeypatch):
    from homebake.model import load
    from homebake.train.setup import setup_training

    def read_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the run was fitted")

    monkeypatch.setattr(load, "load_model", read_weights)
    config = TrainConfig(model=str(tiny_model_dir), out=str(tmp_path / "run"), memory_limit="50MB")
    config.data.paths = [str(tiny_data)]
    with pytest.raises(ConfigError, match="more than the --memory-limit of 50MB"):
        setup_training(config)


def test_the_weight_files_mapped_pages_do_not_count_against_the_budget():
    """Loading peaks with the file's pages resident (page cache the kernel drops before it kills): a run whose
    peak RSS would exceed the budget only by those pages is allowed."""
    plan = MemoryPlan(GIB, 0, 0, 0, GIB // 10, 0, loading=3 * GIB, loading_file=2 * GIB)
    config = TrainConfig()
    fit_to_memory(config, lambda rows, checkpointing: plan, int(1.5 * GIB), "the test budget")
    assert plan.total == 3 * GIB and (config.batch_size, config.gradient_checkpointing) == (8, False)
    with pytest.raises(ConfigError, match="loading the weights"):
        fit_to_memory(TrainConfig(), lambda rows, checkpointing: MemoryPlan(
            GIB // 2, 0, 0, 0, 0, 0, loading=3 * GIB, loading_file=GIB), int(1.5 * GIB), "the test budget")
