"""User-caused tokenizer failures are one-line TokenizerErrors naming the file (or key) and the fix."""

from __future__ import annotations

import json
import shutil

import pytest
import tokenizers
from tok_fixtures import FAMILY_TOKENS, gguf_metadata_from_state

from homebake.errors import TokenizerError
from homebake.tokenizer import Tokenizer


def assert_one_line(error: TokenizerError, *needles: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert error.fix, "every TokenizerError says what to do"
    for needle in needles:
        assert needle in message, (needle, message)


def test_missing_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_hf_dir(tmp_path)
    assert_one_line(caught.value, str(tmp_path / "tokenizer.json"), "not found", "save_pretrained")


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "BPE", "vocab": 3}}', ""])
def test_corrupt_tokenizer_json(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_hf_dir(tmp_path)
    assert_one_line(caught.value, str(tmp_path / "tokenizer.json"), "unreadable", "re-download")


def test_corrupt_tokenizer_config(family_dirs, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(family_dirs["chatml"], folder)
    (folder / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_hf_dir(folder)
    assert_one_line(caught.value, str(folder / "tokenizer_config.json"), "JSON")


def test_no_eos_anywhere(tmp_path):
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0}, merges=[]))
    backend.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_hf_dir(tmp_path)
    assert_one_line(caught.value, "tokenizer_config.json", "eos_token")


@pytest.fixture
def metadata(tiny_state):
    return gguf_metadata_from_state(tiny_state, "smollm", FAMILY_TOKENS["chatml"], bos="<|im_start|>",
                                    eos="<|im_end|>")


@pytest.mark.parametrize("key", ["tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.model",
                                 "tokenizer.ggml.eos_token_id"])
def test_gguf_metadata_missing_key(metadata, key):
    del metadata[key]
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_gguf_metadata(metadata, source="/models/broken.gguf")
    assert_one_line(caught.value, "/models/broken.gguf", key)


def test_gguf_metadata_without_any_tokenizer():
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_gguf_metadata({"general.architecture": "llama"}, source="/models/weights-only.gguf")
    assert_one_line(caught.value, "/models/weights-only.gguf", "tokenizer.ggml", "convert_hf_to_gguf")


def test_unknown_pre_tokenizer_lists_supported(metadata):
    metadata["tokenizer.ggml.pre"] = "deepseek-llm"
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_gguf_metadata(metadata, source="x.gguf")
    assert_one_line(caught.value, "x.gguf", "'deepseek-llm'", "smollm", "llama-bpe", "qwen2", "gpt2", "default")


def test_unknown_tokenizer_model_is_refused(metadata):
    metadata["tokenizer.ggml.model"] = "rwkv"
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_gguf_metadata(metadata, source="rwkv.gguf")
    assert_one_line(caught.value, "rwkv.gguf", "'rwkv'", "'llama', SentencePiece", "tokenizer.json")


def test_sentencepiece_scores_must_match_the_tokens(metadata):
    metadata["tokenizer.ggml.model"] = "llama"
    metadata["tokenizer.ggml.scores"] = [0.0]
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_gguf_metadata(metadata, source="m.gguf")
    assert_one_line(caught.value, "m.gguf", "scores")


@pytest.mark.parametrize("change", [
    {"tokenizer.ggml.token_type": [1, 3]},
    {"tokenizer.ggml.eos_token_id": 10**6},
    {"tokenizer.ggml.tokens": []},
])
def test_inconsistent_gguf_metadata(metadata, change):
    metadata.update(change)
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_gguf_metadata(metadata, source="bad.gguf")
    assert_one_line(caught.value, "bad.gguf")


def test_unknown_pre_tokenizer_cannot_be_written_to_gguf(tmp_path):
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "</s>": 1}, merges=[]))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    backend.decoder = tokenizers.decoders.ByteLevel()
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(TokenizerError) as caught:
        Tokenizer.from_hf_dir(tmp_path).to_gguf_metadata()
    assert_one_line(caught.value, str(tmp_path), "pre-tokenizer", "convert_hf_to_gguf")
