"""Helpers for training tests: a tiny random Llama folder with a byte-level ChatML tokenizer, tiny data, a tiny config.

A plain module (not conftest) so test files can import it unambiguously: every test folder has a conftest."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for tiny_models


def make_tiny_model_dir(directory: Path, variant: str = "llama_tied", seed: int = 0) -> Path:
    from tiny_models import save_byte_tokenizer, save_tiny_hf_model

    save_tiny_hf_model(directory, variant, seed=seed, max_position_embeddings=512)
    save_byte_tokenizer(directory)
    return directory


def write_chat_jsonl(path: Path, count: int, seed: int = 0) -> Path:
    """Arithmetic-style chats: short, learnable, varied lengths (so packing matters)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        messages = [{"role": "system", "content": "add"},
                    {"role": "user", "content": f"{a}+{b}"},
                    {"role": "assistant", "content": str(a + b)}]
        lines.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(lines) + "\n")
    return path


def tiny_config(model_dir: Path, data_path: Path, out: Path, **overrides):
    """A fast, deterministic TrainConfig for the tiny model (fp32, no progress bar)."""
    from homebake.adapters.config import LoraConfig
    from homebake.data.config import DataConfig
    from homebake.train.config import TrainConfig

    data_options = overrides.pop("data", {})
    lora_options = overrides.pop("lora", {})
    values = dict(model=str(model_dir), out=str(out), precision="fp32", device="cpu", batch_size=4,
                  max_steps=4, learning_rate=3e-3, eval_every=0, save_every=100, progress=False)
    values.update(overrides)
    return TrainConfig(data=DataConfig(**{"paths": [str(data_path)], "max_seq_len": 160, **data_options}),
                       lora=LoraConfig(**{"r": 4, "alpha": 8, **lora_options}), **values)
