"""Tiny SentencePiece BPE vocabularies trained with sentencepiece (a test-only dependency) on the tokenizer
test strings, and their GGUF metadata written the way llama.cpp's converter writes a SentencePiece vocab."""

from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "tokenizer"))  # tok_fixtures
from tok_fixtures import _CORPUS_EXTRA, STRINGS  # noqa: E402

CHAT_MARKERS = ["<start_of_turn>", "<end_of_turn>", "<|user|>", "<|end|>", "<|assistant|>", "<|system|>"]


def train_spm(add_dummy_prefix: bool, vocab_size: int = 600) -> bytes:
    """A serialized SentencePiece BPE model (byte fallback, ids: <unk> 0, <s> 1, </s> 2, <pad> 3, markers)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(STRINGS * 3 + _CORPUS_EXTRA * 5), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, byte_fallback=True, character_coverage=0.98, user_defined_symbols=CHAT_MARKERS,
        unk_id=0, bos_id=1, eos_id=2, pad_id=3, split_digits=True, allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False, normalization_rule_name="identity", add_dummy_prefix=add_dummy_prefix,
        minloglevel=2)
    return model.getvalue()


def spm_gguf_metadata(processor, arch: str, add_space_prefix: bool, *, eos: int = 2,
                      chat_template: str | None = None) -> dict:
    """Tokenizer metadata as llama.cpp's converter writes a SentencePiece vocabulary (chat markers CONTROL)."""
    tokens = [processor.id_to_piece(i) for i in range(processor.vocab_size())]

    def kind(i: int) -> int:
        if processor.is_unknown(i):
            return 2
        if processor.is_control(i) or tokens[i] in CHAT_MARKERS:
            return 3
        if processor.is_byte(i):
            return 6
        return 1

    metadata = {
        "general.architecture": arch,
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [processor.get_score(i) for i in range(len(tokens))],
        "tokenizer.ggml.token_type": [kind(i) for i in range(len(tokens))],
        "tokenizer.ggml.unknown_token_id": 0, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": eos,
        "tokenizer.ggml.padding_token_id": 3,
        "tokenizer.ggml.add_space_prefix": add_space_prefix, "tokenizer.ggml.add_bos_token": True,
    }
    if chat_template is not None:
        metadata["tokenizer.chat_template"] = chat_template
    return metadata
