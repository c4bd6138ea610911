"""SentencePiece vocabularies from GGUF (``tokenizer.ggml.model = "llama"``): Gemma-style (no space prefix)
and Phi-3/Llama-style (space prefix) vocabularies trained here with sentencepiece on the test strings.

Checked against three references: transformers' own GGUF tokenizer loading (``AutoTokenizer.from_pretrained(
dir, gguf_file=...)``, which picks its builder by architecture), sentencepiece itself, and llama.cpp where
llama-cpp-python is installed. Plus round trips: GGUF metadata -> Tokenizer -> metadata, and a
SentencePiece-style tokenizer.json folder (with or without tokenizer.model) -> GGUF metadata.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import gguf
import pytest
from tok_fixtures import STRINGS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ for spm_fixtures
from spm_fixtures import spm_gguf_metadata, train_spm  # noqa: E402

from homebake.spm import read_sentencepiece_model
from homebake.tokenizer import TOKEN_BYTE, TOKEN_CONTROL, TOKEN_NORMAL, Tokenizer

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

EXTRA_STRINGS = ["x<end_of_turn>y <end_of_turn> z", "<|user|>\nHi there<|end|>\n<|assistant|>\n",
                 "<start_of_turn>user\nhello<end_of_turn>\n<start_of_turn>model\n", "  two  spaces", "tab\there"]


@pytest.fixture(scope="module")
def spm_models(tmp_path_factory):
    """{"gemma2": (processor, model path), "phi3": ..., "llama": ...}: Gemma's vocabulary has no dummy prefix."""
    root = tmp_path_factory.mktemp("spm")
    models = {}
    for name, prefix in (("gemma2", False), ("phi3", True), ("llama", True)):
        path = root / f"{name}.model"
        path.write_bytes(train_spm(prefix))
        models[name] = (spm.SentencePieceProcessor(model_file=str(path)), path)
    return models


def gguf_metadata(processor, arch: str, add_space_prefix: bool) -> dict:
    return spm_gguf_metadata(processor, arch, add_space_prefix)


def write_gguf_file(path, metadata: dict) -> None:
    """A metadata-only GGUF (enough for transformers' tokenizer loading and llama.cpp's vocab_only)."""
    arch = metadata["general.architecture"]
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(8)
    writer.add_head_count(1)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(metadata["tokenizer.ggml.tokens"])
    writer.add_token_scores(metadata["tokenizer.ggml.scores"])
    writer.add_token_types(metadata["tokenizer.ggml.token_type"])
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(3)
    writer.add_add_space_prefix(metadata["tokenizer.ggml.add_space_prefix"])
    writer.add_add_bos_token(True)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def ours_and_metadata(spm_models, arch):
    processor, _ = spm_models[arch]
    metadata = gguf_metadata(processor, arch, add_space_prefix=arch != "gemma2")
    return Tokenizer.from_gguf_metadata(metadata, source=f"{arch}.gguf"), metadata


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_encodes_like_transformers_gguf_loading(arch, spm_models, tmp_path):
    ours, metadata = ours_and_metadata(spm_models, arch)
    write_gguf_file(tmp_path / "m.gguf", metadata)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in STRINGS + EXTRA_STRINGS:
        ids = reference.encode(text, add_special_tokens=False)
        assert ours.encode(text) == ids, text
        assert ours.encode(text, add_special_tokens=True) == reference.encode(text, add_special_tokens=True), text
        assert ours.decode(ids) == reference.decode(ids, clean_up_tokenization_spaces=False), text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False), text


@pytest.mark.parametrize("arch", ["gemma2", "phi3", "llama"])
def test_encodes_like_sentencepiece(arch, spm_models):
    """Text without control tokens encodes exactly as SentencePiece itself (merges by score, byte fallback,
    the dummy prefix); this is also how llama.cpp's SPM tokenizer works."""
    processor, _ = spm_models[arch]
    ours, _ = ours_and_metadata(spm_models, arch)
    for text in STRINGS + EXTRA_STRINGS[3:]:
        if "<s>" in text or "</s>" in text:  # control tokens are text to sentencepiece, tokens to llama.cpp
            continue
        assert ours.encode(text) == processor.encode(text), text
        assert ours.decode(processor.encode(text)) == processor.decode(processor.encode(text)), text


def test_llama_cpp_whitespace_rules(spm_models):
    phi, _ = ours_and_metadata(spm_models, "phi3")
    gemma, _ = ours_and_metadata(spm_models, "gemma2")
    piece = phi.id_to_token
    # a space prefix starts the text and every fragment after a special token (llama.cpp's is_prev_special)
    after = phi.encode("x<|end|>y")
    assert piece(after[0]).startswith("\u2581")
    assert piece(after[after.index(phi.token_to_id("<|end|>")) + 1]).startswith("\u2581")
    # Gemma: no prefix at all; spaces are pieces of their own
    assert not piece(gemma.encode("hello")[0]).startswith("\u2581")
    # byte fallback: a character no piece covers becomes its UTF-8 bytes, and decodes back
    ids = phi.encode("😀")
    assert [gemma.id_to_token(i) for i in gemma.encode("😀")] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    assert phi.decode(ids) == "😀" and gemma.decode(gemma.encode("😀")) == "😀"
    assert phi.add_bos_token and phi.encode("hi", add_special_tokens=True)[0] == phi.bos_token_id
    assert phi.end_token_ids >= {phi.eos_token_id, phi.token_to_id("<|end|>")}
    assert gemma.end_token_ids >= {gemma.token_to_id("<end_of_turn>")}


@pytest.mark.parametrize("arch", ["gemma2", "phi3"])
def test_gguf_metadata_round_trips(arch, spm_models):
    ours, metadata = ours_and_metadata(spm_models, arch)
    written = ours.to_gguf_metadata()
    for key, value in metadata.items():
        if key != "general.architecture":
            assert written[key] == value, key
    again = Tokenizer.from_gguf_metadata({**written, "general.architecture": arch})
    assert [again.encode(t, add_special_tokens=True) for t in STRINGS] == \
        [ours.encode(t, add_special_tokens=True) for t in STRINGS]


@pytest.mark.parametrize("with_model_file", [True, False])
def test_hf_folder_of_a_sentencepiece_tokenizer_to_gguf(with_model_file, spm_models, tmp_path):
    """A Phi-3-style tokenizer.json folder (as transformers saves it) becomes SentencePiece GGUF metadata:
    exact pieces, scores and types from tokenizer.model when present, else scores ranked by the merges;
    either way the GGUF tokenizer encodes like the folder."""
    processor, model_path = spm_models["phi3"]
    ours, metadata = ours_and_metadata(spm_models, "phi3")
    write_gguf_file(tmp_path / "m.gguf", metadata)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    folder = tmp_path / "hf"
    reference.save_pretrained(folder)
    if with_model_file:
        shutil.copy(model_path, folder / "tokenizer.model")
    from_hf = Tokenizer.from_hf_dir(folder)
    written = from_hf.to_gguf_metadata()
    assert written["tokenizer.ggml.model"] == "llama" and written["tokenizer.ggml.add_space_prefix"] is True
    assert written["tokenizer.ggml.tokens"] == metadata["tokenizer.ggml.tokens"]
    kinds = dict(zip(written["tokenizer.ggml.tokens"], written["tokenizer.ggml.token_type"]))
    assert kinds["<|end|>"] == TOKEN_CONTROL and kinds["<0x41>"] == TOKEN_BYTE and kinds["\u2581the"] == TOKEN_NORMAL
    if with_model_file:
        assert written["tokenizer.ggml.scores"] == metadata["tokenizer.ggml.scores"]
    rebuilt = Tokenizer.from_gguf_metadata({**written, "general.architecture": "phi3"})
    for text in STRINGS + EXTRA_STRINGS:
        assert rebuilt.encode(text, add_special_tokens=True) == from_hf.encode(text, add_special_tokens=True), text


def test_reads_sentencepiece_protobuf(spm_models):
    processor, path = spm_models["gemma2"]
    pieces, add_prefix = read_sentencepiece_model(path)
    assert add_prefix is False and len(pieces) == processor.vocab_size()
    assert pieces[5] == (processor.id_to_piece(5), processor.get_score(5), 4)  # a user-defined chat marker
    assert read_sentencepiece_model(path.parent / "missing.model") is None


def test_llama_cpp_tokenizes_the_same(spm_models, tmp_path):
    llama_cpp = pytest.importorskip("llama_cpp")
    for arch in ("gemma2", "phi3"):
        ours, metadata = ours_and_metadata(spm_models, arch)
        write_gguf_file(tmp_path / f"{arch}.gguf", metadata)
        model = llama_cpp.Llama(str(tmp_path / f"{arch}.gguf"), vocab_only=True, verbose=False)
        for text in STRINGS + EXTRA_STRINGS:
            assert model.tokenize(text.encode(), add_bos=False, special=True) == ours.encode(text), (arch, text)
