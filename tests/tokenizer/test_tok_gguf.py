"""GGUF metadata: reading (token types, special ids, defaults), writing (to_gguf_metadata) and round trips."""

from __future__ import annotations

import pytest
from tok_fixtures import FAMILY_PRE, FAMILY_TOKENS, STRINGS, gguf_metadata_from_state

from homebake.tokenizer import TOKEN_CONTROL, TOKEN_NORMAL, TOKEN_USER_DEFINED, Tokenizer

FAMILIES = ["chatml", "llama3", "qwen2", "mistral"]


def encodings(tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode(text, add_special_tokens=True) for text in STRINGS]


@pytest.mark.default_model
def test_default_model_round_trip(smollm2_metadata):
    tokenizer = Tokenizer.from_gguf_metadata(smollm2_metadata, source="SmolLM2.gguf")
    assert tokenizer.bos_token == "<|im_start|>" and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.end_token_ids == {tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")}
    assert tokenizer.pad_token_id == tokenizer.token_to_id("<|endoftext|>") != tokenizer.eos_token_id
    assert tokenizer.chat_template == smollm2_metadata["tokenizer.chat_template"]

    written = tokenizer.to_gguf_metadata()
    same_keys = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                 "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                 "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template"]
    assert {key: written[key] for key in same_keys} == {key: smollm2_metadata[key] for key in same_keys}
    assert written["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id  # the file's pad was EOS

    again = Tokenizer.from_gguf_metadata(written)
    assert again.to_gguf_metadata() == written
    assert encodings(again) == encodings(tokenizer)
    prompt = [{"role": "user", "content": "What is 2+2?"}]
    assert again.encode_chat(prompt, add_generation_prompt=True) == tokenizer.encode_chat(
        prompt, add_generation_prompt=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_hf_folder_to_gguf_metadata_and_back(family_dirs, family):
    from_hf = Tokenizer.from_hf_dir(family_dirs[family])
    metadata = from_hf.to_gguf_metadata()
    assert metadata["tokenizer.ggml.pre"] == FAMILY_PRE[family]  # detected from tokenizer.json's pre_tokenizer
    kinds = dict(zip(metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.token_type"]))
    for content, special in FAMILY_TOKENS[family]:
        assert kinds[content] == (TOKEN_CONTROL if special else TOKEN_USER_DEFINED)
    added = dict(FAMILY_TOKENS[family])
    assert all(kind == TOKEN_NORMAL for token, kind in kinds.items() if token not in added)

    from_gguf = Tokenizer.from_gguf_metadata(metadata)
    assert encodings(from_gguf) == encodings(from_hf)
    for attribute in ("bos_token_id", "eos_token_id", "pad_token_id", "add_bos_token", "chat_template",
                      "end_token_ids", "vocab_size"):
        assert getattr(from_gguf, attribute) == getattr(from_hf, attribute), attribute
    assert from_gguf.to_gguf_metadata() == metadata


def test_llama_bpe_defaults_to_add_bos_and_missing_pre_is_llama_cpp_default(tiny_state):
    metadata = gguf_metadata_from_state(tiny_state, "llama-bpe", FAMILY_TOKENS["llama3"], bos="<|begin_of_text|>",
                                        eos="<|eot_id|>")
    del metadata["tokenizer.ggml.add_bos_token"]
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    assert tokenizer.add_bos_token and tokenizer.encode("x", add_special_tokens=True)[0] == tokenizer.bos_token_id
    del metadata["tokenizer.ggml.pre"]
    assert Tokenizer.from_gguf_metadata(metadata).gguf_pre == "default"


def test_eot_token_is_an_end_token_and_written_back(tiny_state):
    metadata = gguf_metadata_from_state(tiny_state, "llama-bpe", FAMILY_TOKENS["llama3"], bos="<|begin_of_text|>",
                                        eos="<|end_of_text|>")
    eot = tiny_state["model"]["vocab"]["<|eot_id|>"]
    metadata["tokenizer.ggml.eot_token_id"] = eot
    tokenizer = Tokenizer.from_gguf_metadata(metadata)
    assert eot in tokenizer.end_token_ids and tokenizer.eos_token_id in tokenizer.end_token_ids
    assert tokenizer.to_gguf_metadata()["tokenizer.ggml.eot_token_id"] == eot
