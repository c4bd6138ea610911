"""The loop's decisions on their own: when it evaluates, checkpoints and stops, and what the checkpointer keeps."""

import signal

import pytest
import torch

from homebake.train.checkpoint import Checkpointer, TrainerState, list_checkpoints
from homebake.train.policies import CheckpointPolicy, EvalPolicy, StopPolicy, StopRequest


def test_evaluation_every_n_steps_and_always_at_the_final_step():
    policy = EvalPolicy(every=3)
    assert [s for s in range(1, 8) if policy.due(s, final=s == 7)] == [3, 6, 7]
    only_at_end = EvalPolicy(every=0)
    assert [s for s in range(1, 8) if only_at_end.due(s, final=s == 7)] == [7]


def test_a_fresh_run_evaluates_the_untrained_model_and_a_resumed_one_does_not(tmp_path):
    from homebake.train.config import TrainConfig

    config = TrainConfig(out=str(tmp_path), eval_every=5, early_stopping_min_delta=0.1)
    assert EvalPolicy.from_config(config) == EvalPolicy(5, 0.1, at_start=True)
    assert EvalPolicy.from_config(config, resumed=True).at_start is False


def test_improvement_needs_more_than_min_delta_and_is_recorded_in_the_state():
    policy, state = EvalPolicy(every=1, early_stopping_min_delta=0.01), TrainerState()
    improved = []
    for step, loss in enumerate([3.0, 2.995, 2.5, 2.6], start=1):
        state.step = step
        improved.append(policy.record(state, loss))
    assert improved == [True, False, True, False]
    assert (state.val_loss, state.best_val_loss, state.best_step, state.evals_without_improvement) == (2.6, 2.5, 3, 1)


def test_checkpoint_every_n_steps_on_improvement_and_at_the_final_step():
    policy = CheckpointPolicy(save_every=4)
    assert [s for s in range(1, 10) if policy.due(s, final=s == 9, improved=s == 2)] == [2, 4, 8, 9]


def test_the_final_step_completes_the_run_even_with_a_stop_request():
    stop = StopPolicy(total_steps=5, patience=1, max_minutes=1e-9)
    state = TrainerState(step=5, evals_without_improvement=3, elapsed_s=100.0)
    assert stop.check(state, requested="SIGINT").reason == "completed"


def test_stop_reasons_in_order_request_early_stopping_time_limit():
    stop = StopPolicy(total_steps=100, patience=2, max_minutes=1.0)
    state = TrainerState(step=10, best_val_loss=1.25, best_step=6, evals_without_improvement=2, elapsed_s=61.0)
    assert stop.check(state, requested="SIGTERM").reason == "interrupted"
    early = stop.check(state)
    assert early.reason == "early_stopping"
    assert early.message == ("homebake: early stopping at step 10: validation loss has not improved for 2 "
                             "evaluations (best 1.2500 at step 6)")
    state.evals_without_improvement = 1
    limit = stop.check(state)
    assert limit.reason == "time_limit" and "time limit of 1.0 min reached at step 10" in limit.message
    state.elapsed_s = 59.0
    assert stop.check(state) is None
    assert StopPolicy(total_steps=100).check(TrainerState(step=10, evals_without_improvement=50)) is None


def test_an_epoch_limit_shortens_the_last_accumulation_window():
    by_steps = StopPolicy(total_steps=4)
    assert by_steps.micro_batches(grad_accum=3, consumed=9) == 3
    by_epochs = StopPolicy(total_steps=4, micro_budget=10)  # 10 micro-batches in 3-batch steps: 3, 3, 3, 1
    assert [by_epochs.micro_batches(3, consumed) for consumed in (0, 3, 6, 9)] == [3, 3, 3, 1]


def test_a_first_signal_requests_a_stop_and_a_second_aborts():
    previous = signal.getsignal(signal.SIGTERM)
    with StopRequest() as request:
        assert request.reason is None
        signal.raise_signal(signal.SIGTERM)
        assert request.reason == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is previous


class Position:
    epoch, index = 1, 7


def test_checkpointer_keeps_the_last_k_and_the_best_with_data_position_and_adapter(tmp_path):
    weight = torch.nn.Parameter(torch.ones(2, 2))
    optimizer = torch.optim.AdamW([weight], lr=0.1)
    adapters = []

    def write_adapter(folder):
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        adapters.append(folder.name)

    checkpointer = Checkpointer(tmp_path, {"w": weight}, optimizer, Position(), CheckpointPolicy(save_every=2,
                                keep_last=1), write_adapter=write_adapter)
    state = TrainerState(param_names=["w"])
    for step in range(1, 6):
        state.step = step
        with torch.no_grad():
            weight.fill_(step)
        if step == 1:
            state.best_step = 1
        checkpointer.maybe_save(state, final=step == 5, improved=step == 1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1, 5]  # the best and the last
    assert adapters == ["adapter"] * 4 and checkpointer.last_saved == 5
    assert (state.epoch, state.batch_in_epoch) == (1, 7)
    assert checkpointer.save_if_unsaved(state) is None
    assert checkpointer.restore(1).step == 1  # early stopping exports the best
    assert torch.equal(weight.detach(), torch.ones(2, 2))
    assert (checkpointer.latest() / "adapter" / "adapter_config.json").is_file()
