"""Session fixtures for tokenizer tests: tiny family folders (always) and the default model's
tokenizer as GGUF metadata and as a transformers-saved HF folder (marker default_model)."""

from __future__ import annotations

import json

import pytest
from tok_fixtures import REFERENCE_PRE_TOKENIZERS, read_gguf_tokenizer_metadata, train_tiny_bpe, write_family_folder


@pytest.fixture(scope="session")
def tiny_state():
    return train_tiny_bpe()


@pytest.fixture(scope="session")
def family_dirs(tiny_state, tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {family: write_family_folder(root / family, tiny_state, family)
            for family in ("chatml", "llama3", "qwen2", "mistral")}


@pytest.fixture(scope="session")
def smollm2_metadata(default_gguf):
    return read_gguf_tokenizer_metadata(default_gguf)


@pytest.fixture(scope="session")
def smollm2_hf_dir(default_gguf, tmp_path_factory):
    """transformers' tokenizer for the default model, saved as a tokenizer.json folder.

    transformers' GGUF converter gives it a plain ByteLevel pre-tokenizer; the model's own tokenizer.json
    (and llama.cpp's 'smollm') also split digits, so the folder gets SmolLM2's shipped pre-tokenizer.
    """
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(default_gguf.parent, gguf_file=default_gguf.name)
    folder = tmp_path_factory.mktemp("smollm2")
    reference.save_pretrained(folder)
    state = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    state["pre_tokenizer"] = REFERENCE_PRE_TOKENIZERS["smollm"]
    (folder / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    return folder
