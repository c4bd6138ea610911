"""Several processes, devices or machines: torchrun's environment, the process group, DDP and FSDP2.

homebake runs on the standard engine and nothing of its own: ``torchrun`` (``torch.distributed.run``) starts
the processes and its rendezvous sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``; ``init_world`` reads them and joins the process group (gloo on the CPU, nccl on CUDA, with
timeouts, so a rank that stops answering ends the others instead of hanging them). Without those variables
(or with one process) the world is ``SINGLE``: no process group, no wrappers, the single-process path as it was.

- ``World``: rank, world size, local rank, device, backend; ``is_main`` (rank 0: the run lock, metrics,
  plots, outputs, report), ``barrier``, ``sum`` / ``max`` over ranks, ``broadcast`` / ``gather`` of small
  Python objects, ``run_on_main(fn)`` (rank 0 does it, every rank gets its result or its error).
- ``step_runner(world, ...)``: the plain ``StepRunner`` for one process; else a ``DistributedStepRunner``
  over DDP (adapters: only the trainable parameters communicate) or FSDP2 ``fully_shard`` (full
  fine-tuning, or ``--fsdp``: every weight sharded over the ranks). Its ``loss_sum`` / counts are summed over
  ranks, so the loss is normalised by the trained tokens of the whole global step.
- ``ShardedState``: an FSDP2 model's weights and optimizer through ``torch.distributed.checkpoint`` (every
  rank writes its shards) and the full state dict gathered for the final model.
- ``launch(nproc, argv)``: ``homebake train --nproc-per-node N``, ``torch.distributed.run`` on this machine.
"""

from __future__ import annotations

import datetime
import os
import signal
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..device import pick_device
from ..errors import ConfigError, HomebakeError
from .data_stream import is_filler
from .step import StepRunner

TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
SHARDED_DIR = "sharded"  # an FSDP2 checkpoint's torch.distributed.checkpoint folder


class RankLost(HomebakeError):
    """A collective failed: another rank died or stopped answering."""

    exit_code = 4


class ErrorOnMainRank(HomebakeError):
    """Rank 0 failed at something only it does; it prints the message, the others stay quiet."""

    silent = True


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in TORCHRUN_ENV)


@dataclass
class World:
    """This process's place in the job. ``SINGLE`` (world size 1) has no process group and does nothing."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None  # None: one process, no process group

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"{self.world_size} ranks ({self.backend})" if self.distributed else "1 process"

    # Collectives. Each is a no-op for one process; counts travel as float64 (exact below 2**53).
    def _tensor(self, values) -> torch.Tensor:
        # nccl reduces only CUDA tensors, gloo CPU ones
        return torch.tensor([float(v) for v in values], dtype=torch.float64,
                            device=self.device if self.backend == "nccl" else "cpu")

    def sum(self, *values: float) -> tuple[float, ...]:
        return self._reduce(values, "SUM")

    def max(self, *values: float) -> tuple[float, ...]:
        return self._reduce(values, "MAX")

    def _reduce(self, values, op: str) -> tuple[float, ...]:
        if not self.distributed:
            return tuple(values)
        import torch.distributed as dist

        tensor = self._tensor(values)
        with collective("combining results"):
            dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        return tuple(tensor.tolist())

    def barrier(self, what: str = "waiting for the other ranks") -> None:
        if self.distributed:
            import torch.distributed as dist

            with collective(what):
                dist.barrier()

    def broadcast(self, obj):
        """Rank 0's ``obj`` on every rank (small picklable values)."""
        if not self.distributed:
            return obj
        import torch.distributed as dist

        box = [obj]
        with collective("receiving from rank 0"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj) -> list | None:
        """Every rank's ``obj``, in rank order, on rank 0 (None elsewhere)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.is_main else None
        with collective("gathering on rank 0"):
            dist.gather_object(obj, out, dst=0)
        return out

    def run_on_main(self, fn):
        """``fn()`` on rank 0 only; every rank returns its result. When it raises, rank 0 re-raises the error
        (and prints it) while the others raise a quiet ``ErrorOnMainRank`` with the same exit code."""
        if not self.distributed:
            return fn()
        outcome, error = None, None
        if self.is_main:
            try:
                outcome = ("ok", fn())
            except BaseException as raised:  # noqa: BLE001 - told to the others, then re-raised
                error = raised
                code = raised.exit_code if isinstance(raised, HomebakeError) else 1
                outcome = ("error", str(raised), code)
        outcome = self.broadcast(outcome)
        if error is not None:
            raise error
        if outcome[0] == "error":
            failure = ErrorOnMainRank(f"rank 0 failed: {outcome[1]}")
            failure.exit_code = outcome[2]
            raise failure
        return outcome[1]

    def quiet(self, error: HomebakeError) -> HomebakeError:
        """``error`` as every rank raises it: printed by rank 0 only."""
        if not self.is_main:
            error.silent = True
        return error

    def close(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


SINGLE = World()


@contextmanager
def collective(what: str):
    """A failed collective (a peer died, or did not answer within the timeout) as a one-line ``RankLost``."""
    import torch.distributed as dist

    try:
        yield
    except (dist.DistError, RuntimeError) as error:
        if isinstance(error, RuntimeError) and not isinstance(error, dist.DistError) \
                and not _looks_like_comm_error(error):
            raise
        raise lost_contact(what, error) from None


def _looks_like_comm_error(error: BaseException) -> bool:
    text = str(error).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer",
                                         "socket", "broken pipe", "process group"))


def lost_contact(what: str, error: BaseException) -> RankLost:
    rank = os.environ.get("RANK", "?")
    reason = " ".join(str(error).split())[:160]
    return RankLost(f"rank {rank} lost contact with the other ranks while {what} ({reason})",
                    fix="another rank failed or was killed: its own message and torchrun's summary name it; "
                        "continue from the last checkpoint with --resume")


def init_world(config) -> World:
    """The world torchrun describes (``SINGLE`` outside torchrun or with one process), process group joined.

    Device: ``--device auto``/``cuda`` gives each rank ``cuda:LOCAL_RANK`` (nccl); ``cpu`` (or no GPU) gloo."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) <= 1:
        return World(device=pick_device(config.device))
    rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_ENV)
    device = pick_device(config.device)
    try:
        check_ranks(config, device, local_rank + 1)
    except ConfigError as error:
        if rank:
            error.silent = True  # the same on every rank: rank 0 says it
        raise
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)  # one GPU per rank, whatever cuda:N said
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    import torch.distributed as dist

    timeout = datetime.timedelta(minutes=config.dist_timeout_minutes)
    kwargs = {"device_id": device} if backend == "nccl" else {}  # nccl: bind the GPU, connect eagerly
    with collective("joining the job"):
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    return World(rank, world_size, local_rank, device, backend)


def check_ranks(config, device: torch.device, processes: int) -> None:
    """What several processes on ``device`` cannot do, as one-line errors (the launcher checks before starting
    them; each rank again under a plain torchrun)."""
    if device.type == "mps":
        raise ConfigError("several processes cannot share an Apple GPU (torch.distributed has no MPS backend)",
                          where="--device", fix="train in one process (drop --nproc-per-node), or use --device cpu")
    if device.type == "cuda" and processes > torch.cuda.device_count():
        raise ConfigError(f"{processes} processes per machine, but it has {torch.cuda.device_count()} GPU(s)",
                          where="--nproc-per-node", fix="start at most one process per GPU")
    if config.fsdp and config.method != "full" and device.type != "cuda":
        raise ConfigError("--fsdp with adapters needs CUDA GPUs: sharding the frozen base over CPU processes "
                          "saves nothing worth the traffic", where="--fsdp",
                          fix="drop --fsdp (adapters train with DDP), or train on GPUs")


def strategy_for(config, world: World) -> str | None:
    """None (one process), "ddp" (adapters) or "fsdp" (full fine-tuning, or --fsdp)."""
    if not world.distributed:
        return None
    return "fsdp" if config.method == "full" or config.fsdp else "ddp"


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks FSDP2 shards one by one (each all-gathered just before it runs)."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    return list(layers) if layers is not None else []


class DistributedStepRunner(StepRunner):
    """A ``StepRunner`` whose counts and loss sums cover every rank.

    DDP and FSDP2 average gradients over the ranks; each rank's loss is divided by the *global* step's
    normaliser, so ``loss_scale`` (the world size) turns that average back into the sum: N ranks × B rows
    give the gradient of one process × N·B rows. A rank whose share of a micro-batch is empty runs a filler
    row weighted 0, so every rank takes part in every collective."""

    def __init__(self, model, inner, head_weight, compute_dtype, device, chunk_rows, *, world: World,
                 strategy: str, objective=None):
        # the head comes from the CausalLM itself (DDP's wrapper has no ``logits``); forwards go through ``model``
        super().__init__(inner, head_weight, compute_dtype, device, chunk_rows, objective=objective)
        self.model = model
        self.inner = inner  # the CausalLM itself (DDP wraps it; FSDP2 shards it in place)
        self.world = world
        self.strategy = strategy
        self.loss_scale = float(world.world_size)

    @property
    def head(self):
        if self.strategy == "fsdp":  # the root's parameters are swapped for their unsharded copies per forward
            from .loss import lm_head

            return lm_head(self.inner)
        return self._head

    def loss_sum(self, batch):
        if not is_filler(batch):
            return super().loss_sum(batch)
        hold = self.objective.unrecorded() if self.objective is not None else nullcontext()
        with hold:
            loss, _ = super().loss_sum(batch)
        return loss * 0.0, 0  # the graph reaches every parameter; the gradient is zero

    def sum_over_ranks(self, *values):
        return self.world.sum(*values)

    def sync_gradients(self, last: bool):
        """Communicate gradients only at the step's last micro-batch (accumulate locally before)."""
        if self.strategy == "ddp":
            return nullcontext() if last else self.model.no_sync()
        self.model.set_requires_gradient_sync(last)
        return nullcontext()

    def full_norm(self, norm):
        # FSDP2's gradients are DTensor shards: their norm is a DTensor to complete over the ranks
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def take_stats(self) -> dict[str, float]:
        if self.objective is None:
            return {}
        sums, pairs = self.objective.take_sums()
        keys = self.objective.stat_keys
        totals = self.world.sum(pairs, *(sums.get(key, 0.0) for key in keys))
        pairs = totals[0]
        return {key: round(value / pairs, 6) for key, value in zip(keys, totals[1:])} if pairs else {}

    def evaluate(self, batches):
        loss = super().evaluate(batches)
        if self.strategy == "fsdp":
            self.model.reshard()  # a no-grad forward leaves the root unsharded; checkpoints want the shards
        return loss


def step_runner(world: World, model_setup, compute_dtype: torch.dtype, chunk_rows: int | None, *,
                strategy: str | None, objective=None) -> StepRunner:
    """The run's step runner: plain for one process; else the model under DDP or FSDP2. For FSDP2 the
    trainable parameters become DTensor shards: ``model_setup.trainable`` is refreshed (build the
    optimizer after this)."""
    model = model_setup.model
    if strategy is None:
        return StepRunner(model, model_setup.head_weight, compute_dtype, world.device, chunk_rows,
                          objective=objective)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        with torch.no_grad(), collective("sharing the initial adapter weights"):
            import torch.distributed as dist

            for param in model_setup.trainable.values():  # same start on every rank, whatever each drew
                dist.broadcast(param.data, src=0)
            # frozen weights are loaded identically everywhere: init_sync=False skips broadcasting them
            wrapped = DistributedDataParallel(
                model, device_ids=[world.device.index] if world.device.type == "cuda" else None,
                forward_sync_buffers=False, init_sync=False)
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(world.device.type, (world.world_size,))
        policy = MixedPrecisionPolicy() if compute_dtype == torch.float32 else MixedPrecisionPolicy(
            param_dtype=compute_dtype, reduce_dtype=torch.float32)  # gather in bf16, reduce gradients in fp32
        with collective("sharding the model"):
            for layer in decoder_layers(model):
                fully_shard(layer, mesh=mesh, mp_policy=policy)
            # the root (embeddings, final norm, head) stays unsharded from forward to backward: the loss reads
            # the head matrix after the forward
            fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
        wrapped = model
        model_setup.trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return DistributedStepRunner(wrapped, model, model_setup.head_weight, compute_dtype, world.device, chunk_rows,
                                 world=world, strategy=strategy, objective=objective)


class ShardedState:
    """An FSDP2 model's weights and optimizer state in ``torch.distributed.checkpoint`` format: every rank
    writes (and reads) its own shards of ``folder``; rank 0 adds the metadata once all have written."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def save(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        with collective("writing the checkpoint's shards"):
            dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder))

    def load(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        with collective("reading the checkpoint's shards"):
            dcp.load(state, checkpoint_id=str(folder))
            set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0's CPU (empty elsewhere); every rank must call it."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        with collective("gathering the model"):
            return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                             cpu_offload=True))


def launch(nproc: int, argv: list[str], config) -> int:
    """``homebake train ... --nproc-per-node N``: the same command in N processes on this machine, started by
    ``torch.distributed.run`` (torchrun's own launcher and rendezvous). ``argv``: the command line after
    ``homebake``, without --nproc-per-node; ``config`` its resolved ``TrainConfig``. Returns the exit code; a rank
    that fails is named in one line."""
    out = config.out
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    check_ranks(config, pick_device(config.device), nproc)  # refuse before starting anything
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # N processes share the cores (torchrun's default, unwarned)
    # exactly `torchrun --standalone --nproc-per-node N -m homebake ARGV`, in this process
    args = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "--module", "homebake",
                                         *argv])
    try:
        run(args)
    except ChildFailedError as failed:
        return _report_failure(failed, out, nproc)
    except SignalException as stopped:  # SIGTERM/SIGINT to the launcher: torchrun passed it to every rank
        print(f"homebake: {signal.Signals(stopped.sigval).name}: the ranks saved a checkpoint; continue with "
              f"`homebake train --out {out} --resume --nproc-per-node {nproc}`", file=sys.stderr)
        return 130
    return 0


def _report_failure(failed, out: str, nproc: int) -> int:
    failures = failed.failures
    codes = {failure.exitcode for failure in failures.values()}
    if codes == {130}:  # every rank stopped on a signal after saving a checkpoint (StopRequest)
        return 130
    rank, first = failed.get_first_failure()  # failures are keyed by global rank
    if first.exitcode < 0:
        how = f"was killed by {signal.Signals(-first.exitcode).name}"
    else:
        how = f"exited with code {first.exitcode}"
    if first.exitcode in (2, 3):  # a HomebakeError: rank 0 printed what to do
        return first.exitcode
    print(f"homebake: error: rank {rank} (pid {first.pid}) {how}; torchrun stopped the other ranks — "
          f"continue from the last checkpoint with `homebake train --out {out} --resume --nproc-per-node {nproc}`",
          file=sys.stderr)
    return first.exitcode if first.exitcode > 0 else 1
