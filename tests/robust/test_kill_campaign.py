"""Kill anywhere: SIGKILL `homebake train` at chosen and random moments -- inside checkpoint writing, the final
adapter write, evaluation, metrics, the config, a training step -- and `homebake export` / `merge` while they write.

After each training kill, `homebake train ... --resume` must reproduce the uninterrupted run exactly (every per-step
train and validation loss, the adapter tensors, the kept checkpoints) and leave no temporaries or lock behind.
After each export kill, its output must be either complete and loadable (identical to an uninterrupted export) or
absent, and a previous good output of the same name intact. The counts are printed in the terminal summary.

Runs go through a fork server (kill_runner.py) so each costs its own work only; kill points are the runner's
event counter (writes, renames, deletes, model forwards), chosen from a recorded uninterrupted run, plus random
times. The seed is printed; HOMEBAKE_KILL_SEED replays a campaign.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import report
from safetensors.torch import load_file

from homebake.run_folder import LOCK_FILE, leftovers, list_checkpoints, read_metrics

HERE = Path(__file__).resolve().parent
SRC = HERE.parents[1] / "src"
STEPS = 8

pytestmark = pytest.mark.slow


class Runner:
    def __init__(self, logs: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(HERE)]), "OMP_NUM_THREADS": "1",
               "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "kill_runner.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.logs, self.jobs = logs, 0

    def run(self, argv, *, kill_at=None, kill_after_s=None, record=None) -> dict:
        self.jobs += 1
        log = self.logs / f"job-{self.jobs:03d}.log"
        job = {"argv": [str(a) for a in argv], "log": str(log), "kill_at": kill_at, "kill_after_s": kill_after_s,
               "record": str(record) if record else None}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        reply = json.loads(self.proc.stdout.readline())
        reply["log"] = log
        return reply

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def campaign(tmp_path_factory):
    from tiny_models import save_byte_tokenizer, save_tiny_hf_model
    from train_helpers import write_chat_jsonl

    root = tmp_path_factory.mktemp("kills")
    model = root / "model"
    save_tiny_hf_model(model, "llama_tied", seed=0, max_position_embeddings=512)
    save_byte_tokenizer(model, merges=[("1", "2")])
    data = write_chat_jsonl(root / "chats.jsonl", 32)
    (root / "logs").mkdir()
    runner = Runner(root / "logs")
    seed = int(os.environ.get("HOMEBAKE_KILL_SEED", random.SystemRandom().randrange(10**6)))
    yield root, model, data, runner, random.Random(seed), seed
    runner.close()


def train_argv(model, data, out):
    return ["train", "--model", model, "--data", data, "--out", out, "--precision", "fp32", "--device", "cpu",
            "--max-steps", STEPS, "--save-every", "2", "--keep-last", "2", "--eval-every", "3", "--batch-size", "2",
            "--max-seq-len", "160", "--lora-r", "2", "--lora-dropout", "0.1", "--learning-rate", "3e-3",
            "--no-progress"]


def read_events(path: Path) -> list[tuple[int, str, str]]:
    events = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            number, kind, where = line.split("\t")
            events.append((int(number), kind, where))
    return events


def category(kind: str, where: str) -> str:
    if kind in ("step", "eval"):
        return {"step": "training step", "eval": "evaluation"}[kind]
    for needle, name in (("/checkpoints/", "checkpoint writing"), (".adapter.tmp", "final adapter write"),
                         ("adapter_model.safetensors", "final adapter write"), ("adapter_config.json",
                                                                                 "final adapter write"),
                         ("metrics.jsonl", "metrics"), ("config.yaml", "config"), ("loss.png", "plot"),
                         ("report.html", "report")):
        if needle in where:
            return name
    return "other"


def run_record(out: Path) -> dict:
    """What must be identical to the uninterrupted run."""
    records = read_metrics(out)
    adapter = load_file(str(out / "adapter_model.safetensors"))
    return {"losses": sorted((r["step"], "loss" in r, r.get("loss"), r.get("val_loss")) for r in records),
            "adapter": {k: v.tolist() for k, v in adapter.items()},
            "checkpoints": [step for step, _ in list_checkpoints(out)]}


def digest(path: Path) -> dict:
    if path.is_file():
        return {path.name: hashlib.sha256(path.read_bytes()).hexdigest()}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def test_kill_anywhere(campaign):
    root, model, data, runner, rng, seed = campaign
    print(f"kill campaign seed {seed} (HOMEBAKE_KILL_SEED={seed} replays it)")
    started = time.monotonic()

    # -- the uninterrupted run, its event list, and what every resumed run must equal
    reference, events_file = root / "reference", root / "events.tsv"
    reply = runner.run(train_argv(model, data, reference), record=events_file)
    assert reply["rc"] == 0, reply["log"].read_text()[-3000:]
    expected, run_seconds = run_record(reference), reply["seconds"]
    events = read_events(events_file)
    by_category: dict[str, list[int]] = {}
    for number, kind, where in events:
        by_category.setdefault(category(kind, where), []).append(number)
    plan = {"checkpoint writing": 8, "final adapter write": 4, "evaluation": 3, "metrics": 2, "config": 1,
            "training step": 2, "report": 1}
    kills = [(name, rng.choice(by_category[name])) for name, count in plan.items() for _ in range(count)
             if by_category.get(name)]
    kills += [("random time", None)] * 7

    # -- training: kill, then resume; twice, the resumed run is killed too
    outcomes, failures, categories = [], [], {}
    for index, (name, kill_at) in enumerate(kills):
        out = root / f"train-{index:02d}"
        delay = round(rng.uniform(0.05, run_seconds), 3) if kill_at is None else None
        reply = runner.run(train_argv(model, data, out), kill_at=kill_at, kill_after_s=delay)
        if not reply["killed"]:  # a random time after the run had ended: not a kill
            continue
        if index in (3, 12):  # kill the resume as well, at a random moment of it
            again = runner.run([*train_argv(model, data, out), "--resume"],
                               kill_after_s=round(rng.uniform(0.05, run_seconds), 3))
            name += " (+ resume killed)" if again["killed"] else ""
        resumed = runner.run([*train_argv(model, data, out), "--resume"])
        ok = resumed["rc"] == 0 and run_record(out) == expected and leftovers(out) == [] \
            and not (out / LOCK_FILE).exists()
        outcomes.append(ok)
        categories[name.split(" (")[0]] = categories.get(name.split(" (")[0], 0) + 1
        if not ok:
            failures.append(f"{name} at {kill_at or delay}: rc {resumed['rc']}, log {resumed['log']}")

    # -- exports and merges: a previous good output with the same name, or none
    run = reference
    exports = {
        "gguf": (["export", run, "--model", model, "--format", "gguf", "--quant", "F16"],
                 ["export", run, "--model", model, "--format", "gguf", "--quant", "F32"]),
        "merge": (["merge", run, "--model", model],
                  ["export", model, "--format", "hf"]),  # the previous output: the plain base model
    }
    new_output, old_output = {}, {}
    for kind, (argv, previous_argv) in exports.items():
        record = root / f"events-{kind}.tsv"
        reply = runner.run([*argv, "--out", root / f"ref-{kind}"], record=record)
        assert reply["rc"] == 0, reply["log"].read_text()[-3000:]
        new_output[kind] = digest(root / f"ref-{kind}")
        assert runner.run([*previous_argv, "--out", root / f"old-{kind}"])["rc"] == 0
        old_output[kind] = digest(root / f"old-{kind}")
        exports[kind] = (argv, previous_argv, [n for n, _, _ in read_events(record)], reply["seconds"])
    intact, export_failures, export_kills = 0, [], 0
    for index in range(14):
        kind = "gguf" if index % 2 else "merge"
        argv, previous_argv, numbers, seconds = exports[kind]
        with_previous = index % 7 != 0
        out = root / f"{kind}-{index:02d}"
        if with_previous:
            assert runner.run([*previous_argv, "--out", out])["rc"] == 0
        timed = index >= 12
        reply = runner.run([*argv, "--out", out, *(["--force"] if with_previous else [])],
                           kill_at=None if timed else rng.choice(numbers),
                           kill_after_s=round(rng.uniform(0.02, seconds), 3) if timed else None)
        if not reply["killed"]:
            continue
        export_kills += 1
        found = digest(out) if out.exists() else None
        allowed = [new_output[kind]] + ([old_output[kind]] if with_previous else [None])
        ok = found in allowed and (found is None or _loadable(out, kind))
        intact += ok
        if not ok:
            export_failures.append(f"{kind} #{index} killed at {reply}: {'missing' if found is None else 'changed'}")
    # the next export of the same name removes what the killed ones left (no disk space leaks)
    for kind in exports:
        out = root / f"{kind}-01"
        assert runner.run([*exports[kind][0], "--out", out, "--force"])["rc"] == 0
    stale = [p.name for p in root.iterdir() if p.name.startswith((".gguf-01.", ".merge-01."))]

    summary = (f"kills {len(outcomes) + export_kills} (train {len(outcomes)}, export/merge {export_kills}), "
               f"resumed equal {sum(outcomes)}/{len(outcomes)}, outputs intact {intact}/{export_kills}; "
               f"train kills by moment: {', '.join(f'{k} {v}' for k, v in categories.items())}; "
               f"{time.monotonic() - started:.0f} s; seed {seed}")
    report("kill campaign", summary)
    print(summary)
    assert not failures and not export_failures, failures + export_failures
    assert len(outcomes) >= 20 and export_kills >= 10
    assert stale == [], stale


def _loadable(out: Path, kind: str) -> bool:
    from homebake.model.gguf_file import read_gguf
    from homebake.model.load import load_model

    if kind == "gguf":
        files = list(out.glob("*.gguf"))
        return len(files) == 1 and bool(read_gguf(files[0]).tensors)
    return load_model(out).model is not None
