"""Encoding parity with transformers: from tokenizer.json folders and from GGUF metadata (all four
llama.cpp pre-tokenizer names), on tiny trained vocabularies and on the default model's vocabulary."""

from __future__ import annotations

import json
import shutil

import pytest
from tok_fixtures import (FAMILY_TOKENS, REFERENCE_PRE_TOKENIZERS, STRINGS, gguf_metadata_from_state,
                          tokenizer_json)

from homebake.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

FAMILIES = ["chatml", "llama3", "qwen2", "mistral"]
PRE_NAMES = ["smollm", "llama-bpe", "qwen2", "gpt-2"]
ALL_ADDED = list({content: (content, special) for tokens in FAMILY_TOKENS.values()
                  for content, special in tokens}.values())


def assert_same_encoding(ours: Tokenizer, reference, *, with_bos: bool = True) -> None:
    for text in STRINGS:
        ids = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        if with_bos:
            assert ours.encode(text, add_special_tokens=True) == reference.encode(text, add_special_tokens=True), text
        assert ours.decode(ids) == reference.decode(ids, clean_up_tokenization_spaces=False), text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False), text


def reference_folder(folder, state: dict, config: dict) -> transformers.PreTrainedTokenizerBase:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_dir_encodes_like_transformers(family, family_dirs):
    ours = Tokenizer.from_hf_dir(family_dirs[family])
    assert_same_encoding(ours, transformers.AutoTokenizer.from_pretrained(family_dirs[family]))


@pytest.mark.parametrize("pre", PRE_NAMES)
def test_gguf_metadata_encodes_like_transformers_tiny_vocab(pre, tiny_state, tmp_path):
    metadata = gguf_metadata_from_state(tiny_state, pre, ALL_ADDED, bos=None, eos="<|im_end|>")
    reference = reference_folder(tmp_path, tokenizer_json(tiny_state, pre, ALL_ADDED),
                                 {"eos_token": "<|im_end|>", "clean_up_tokenization_spaces": False})
    assert_same_encoding(Tokenizer.from_gguf_metadata(metadata), reference)


def test_pre_tokenizer_names_change_the_encoding(tiny_state):
    """Guards the parity tests above: each name really selects a different split."""
    encodings = {}
    for pre in PRE_NAMES:
        tokenizer = Tokenizer.from_gguf_metadata(gguf_metadata_from_state(tiny_state, pre, [], bos=None,
                                                                          eos="<|im_end|>"))
        encodings[pre] = [tokenizer.encode(text) for text in STRINGS]
    for first in PRE_NAMES:
        for second in PRE_NAMES:
            if first < second:
                assert encodings[first] != encodings[second], (first, second)


@pytest.mark.default_model
def test_hf_dir_encodes_like_transformers_default_model(smollm2_hf_dir):
    ours = Tokenizer.from_hf_dir(smollm2_hf_dir)
    assert ours.vocab_size == 49152
    assert_same_encoding(ours, transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir))


@pytest.mark.default_model
@pytest.mark.parametrize("pre", PRE_NAMES)
def test_gguf_metadata_encodes_like_transformers_default_model(pre, smollm2_metadata, smollm2_hf_dir, tmp_path):
    """The default model's own GGUF vocabulary, read with gguf's reader, under each pre-tokenizer name,
    against transformers' tokenizer for that vocabulary with the pre-tokenizer the models ship."""
    metadata = {**smollm2_metadata, "tokenizer.ggml.pre": pre}
    state = json.loads((smollm2_hf_dir / "tokenizer.json").read_text(encoding="utf-8"))
    state["pre_tokenizer"] = REFERENCE_PRE_TOKENIZERS[pre]
    state["model"]["ignore_merges"] = pre == "llama-bpe"
    shutil.copy(smollm2_hf_dir / "tokenizer_config.json", tmp_path / "tokenizer_config.json")
    (tmp_path / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert_same_encoding(Tokenizer.from_gguf_metadata(metadata), reference)
