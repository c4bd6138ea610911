"""Fixtures for evaluation tests: a tiny random Llama (hidden 64, 2 layers) with a byte-level ChatML tokenizer, the extraction
dataset at tiny scale, and a LoRA run of a few steps on it."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent
sys.path.insert(0, str(TESTS))  # tiny_models
sys.path.insert(0, str(Path(__file__).resolve().parent))  # chromium.py


def _load(name: str, path: Path):
    """Import a helper module by path (another folder's conftest.py cannot be imported as `conftest` here)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# the export tests' byte-level tokenizer has a few BPE merges (a GGUF cannot hold an empty merge list)
export_fixtures = _load("homebake_export_fixtures", TESTS / "export" / "conftest.py")
make_dataset = _load("homebake_extract_dataset", ROOT / "examples" / "extract" / "make_dataset.py")


@pytest.fixture(autouse=True)
def _tiny_models_run_single_threaded(one_thread):
    yield


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tiny_models import save_tiny_hf_model

    from tokenizers import Tokenizer

    directory = tmp_path_factory.mktemp("eval-tiny-llama")
    export_fixtures.save_byte_tokenizer(directory)
    # the vocabulary exactly as large as the tokenizer: llama.cpp refuses a GGUF whose embedding has more rows
    # than the token list; a long context for the few-shot prompts (~250 byte tokens per shot)
    vocab = Tokenizer.from_file(str(directory / "tokenizer.json")).get_vocab_size()
    save_tiny_hf_model(directory, "llama_tied", max_position_embeddings=4096, vocab_size=vocab)
    return directory


@pytest.fixture(scope="session")
def extract_dir(tmp_path_factory) -> Path:
    """The demo's dataset generator at tiny scale: train / valid / test JSONL."""
    folder = tmp_path_factory.mktemp("extract")
    for split, rows in make_dataset.make_splits({"test": 6, "valid": 4, "train": 24}, seed=7).items():
        (folder / f"{split}.jsonl").write_text(make_dataset.render_jsonl(rows))
    return folder


@pytest.fixture(scope="session")
def tiny_run(tiny_model_dir, extract_dir, tmp_path_factory) -> Path:
    """A LoRA training run of a few steps on the tiny model (the folder `homebake train --out` writes)."""
    import torch

    from homebake.adapters.config import LoraConfig
    from homebake.data.config import DataConfig
    from homebake.train.config import TrainConfig
    from homebake.train.loop import train

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("eval-run") / "run"
    config = TrainConfig(model=str(tiny_model_dir), out=str(out), precision="fp32", device="cpu", batch_size=4,
                         max_steps=4, learning_rate=1e-2, eval_every=2, progress=False,
                         data=DataConfig(paths=[str(extract_dir / "train.jsonl")],
                                         validation=str(extract_dir / "valid.jsonl"), max_seq_len=512),
                         lora=LoraConfig(r=4, alpha=8, dropout=0.0))
    train(config)
    return out
