"""Fixtures for export tests: a tiny random Llama (GQA, rows of 256 so K-quants apply) with a byte-level
ChatML tokenizer, a LoRA run folder trained on it (random non-zero adapters), and the CLI in-process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(TESTS))  # tiny_models
TINY = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512)


def save_byte_tokenizer(directory: Path) -> None:
    """The byte-level ChatML tokenizer with a few merges (a GGUF cannot hold an empty merge list)."""
    from tiny_models import save_byte_tokenizer as save

    save(directory, merges=[("Ġ", "t"), ("h", "e"), ("Ġt", "he")], bos_token="<|im_start|>")


def make_model_dir(directory: Path, variant: str = "llama", seed: int = 0, **overrides) -> Path:
    from tiny_models import save_tiny_hf_model

    save_tiny_hf_model(directory, variant, seed=seed, **{**TINY, **overrides})
    save_byte_tokenizer(directory)
    return directory


def make_adapter(base: str | Path, out: Path, *, use_dora: bool = False, seed: int = 1,
                 run_config: bool = True) -> Path:
    """A LoRA (or DoRA) adapter with random non-zero weights, saved the way the trainer saves a run."""
    from homebake.adapters.config import LoraConfig
    from homebake.adapters.lora import inject_lora, lora_modules, lora_state_dict
    from homebake.adapters.peft import save_peft_adapter
    from homebake.model.load import load_model

    loaded = load_model(str(base), with_tokenizer=False)
    config = LoraConfig(r=4, alpha=8, dropout=0.0, use_dora=use_dora)
    torch.manual_seed(seed)
    inject_lora(loaded.model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(loaded.model).values():
            module.lora_B.weight.copy_(0.05 * torch.randn(module.lora_B.weight.shape, generator=generator))
            if module.lora_magnitude is not None:
                module.lora_magnitude.mul_(1 + 0.1 * torch.rand(module.lora_magnitude.shape, generator=generator))
    save_peft_adapter(out, lora_state_dict(loaded.model), config, str(base))
    if run_config:
        (out / "config.yaml").write_text(f"model: {base}\nmethod: {'dora' if use_dora else 'lora'}\n")
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory, tiny_dir) -> Path:
    return make_adapter(tiny_dir, tmp_path_factory.mktemp("run") / "lora-run")


@pytest.fixture(scope="session")
def dora_run(tmp_path_factory, tiny_dir) -> Path:
    return make_adapter(tiny_dir, tmp_path_factory.mktemp("run") / "dora-run", use_dora=True)


@pytest.fixture
def cli(capsys):
    """Run `homebake ...` in-process: returns (exit code, stdout, stderr)."""
    from homebake.cli import main

    def run(*argv):
        code = main([str(a) for a in argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def merged_reference(run_dir: Path):
    """The homebake model with the run's adapter merged (fp32), and its tokenizer."""
    from homebake.sources import open_source

    source = open_source(run_dir)
    model = source.loaded.model
    model.load_state_dict(source.merged_state_dict())
    return model.eval(), source.loaded.tokenizer


def logits_of(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model.logits(model(torch.tensor([ids])))[0]
