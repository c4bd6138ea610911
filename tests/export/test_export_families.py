"""A GGUF of each new family (Gemma 2, Gemma 3, Phi-3) with a SentencePiece vocabulary goes in and comes out:
homebake reads it (weights and tokenizer), exports it again as GGUF (same tensors, same vocabulary), as a
merged HF folder transformers loads with equal logits and an equal tokenizer, and as an Ollama Modelfile
whose TEMPLATE is the family's."""

from __future__ import annotations

import pytest
import torch

from homebake.export.gguf import tokenizer_gguf_metadata, write_model_gguf
from homebake.model.gguf_file import read_gguf
from homebake.model.load import load_model
from homebake.tokenizer import Tokenizer

from .conftest import logits_of

spm = pytest.importorskip("sentencepiece")
transformers = pytest.importorskip("transformers")

TEMPLATES = {"gemma2": "gemma-2-it.jinja", "gemma3": "gemma-3-it.jinja", "phi3": "phi-3-mini-instruct.jinja"}
TEXTS = ["Hello, world! How's it going?", "  two  spaces\tand tabs", "Emoji: 😀 done",
         "<start_of_turn>user\nhi<end_of_turn>\n", "<|user|>\nWhat is 2+2?<|end|>\n<|assistant|>\n"]
CHAT = [{"role": "user", "content": "What is 2+2?"}]


@pytest.fixture(scope="module")
def family_gguf(tmp_path_factory):
    """family -> (GGUF path, transformers reference model, tokenizer it holds), built once."""
    from spm_fixtures import spm_gguf_metadata, train_spm
    from tiny_models import TESTS_TEMPLATES, load_hf_reference, save_tiny_hf_model

    cache = {}

    def get(family: str, **overrides):
        key = (family, tuple(sorted(overrides.items())))
        if key in cache:
            return cache[key]
        root = tmp_path_factory.mktemp(family)
        processor = spm.SentencePieceProcessor(model_proto=train_spm(add_dummy_prefix=family == "phi3"))
        end = "<|end|>" if family == "phi3" else "<end_of_turn>"
        template = (TESTS_TEMPLATES / TEMPLATES[family]).read_text(encoding="utf-8")
        metadata = spm_gguf_metadata(processor, {"gemma3": "gemma3"}.get(family, family), family == "phi3",
                                     chat_template=template)
        metadata["tokenizer.ggml.eot_token_id"] = processor.piece_to_id(end)
        tokenizer = Tokenizer.from_gguf_metadata(metadata)
        folder = save_tiny_hf_model(root / "hf", family, vocab_size=608, **overrides)  # 8 rows past the vocab
        loaded = load_model(folder, with_tokenizer=False)
        path = root / f"{family}.gguf"
        write_model_gguf(path, loaded.model.state_dict(), loaded.args, tokenizer_metadata=tokenizer_gguf_metadata(
            tokenizer), quant="F32")
        cache[key] = (path, load_hf_reference(folder), tokenizer)
        return cache[key]

    return get


@pytest.mark.parametrize("family", ["gemma2", "gemma3", "phi3"])
def test_gguf_in_gguf_out(family, family_gguf, cli, tmp_path):
    path, reference, tokenizer = family_gguf(family)
    loaded = load_model(path)
    ids = loaded.tokenizer.encode_chat(CHAT, add_generation_prompt=True)
    assert ids == tokenizer.encode_chat(CHAT, add_generation_prompt=True)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    assert (logits_of(loaded.model, ids) - expected).abs().max() <= 1e-4
    assert [loaded.tokenizer.encode(t) for t in TEXTS] == [tokenizer.encode(t) for t in TEXTS]

    out = tmp_path / "gguf"
    code, _, err = cli("export", path, "--format", "gguf", "--quant", "F32", "--out", out)
    assert code == 0, err
    (exported,) = out.glob("*.gguf")
    before, after = read_gguf(path), read_gguf(exported)
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
                "tokenizer.ggml.add_space_prefix", "tokenizer.chat_template", "general.architecture"):
        assert after.metadata[key] == before.metadata[key], key
    assert len(after.metadata["tokenizer.ggml.tokens"]) == 608  # padded to the embedding rows, as llama.cpp wants
    again = load_model(exported)
    assert (logits_of(again.model, ids) - expected).abs().max() <= 1e-4


@pytest.mark.parametrize("family", ["gemma3", "phi3"])
def test_gguf_to_hf_folder_loads_in_transformers(family, family_gguf, cli, tmp_path):
    path, reference, tokenizer = family_gguf(family)
    out = tmp_path / "hf"
    code, _, err = cli("export", path, "--format", "hf", "--dtype", "fp32", "--out", out)
    assert code == 0, err
    model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer.encode_chat(CHAT, add_generation_prompt=True)
    rendered = hf_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert hf_tokenizer(rendered, add_special_tokens=False)["input_ids"] == tokenizer.encode(rendered)
    for text in TEXTS:
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode(text), text
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])).logits, reference(torch.tensor([ids])).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family,marker,stop", [("gemma2", "<start_of_turn>", "<end_of_turn>"),
                                                ("phi3", "<|assistant|>", "<|end|>")])
def test_ollama_export_uses_the_family_template(family, marker, stop, family_gguf, cli, tmp_path):
    path, _, _ = family_gguf(family)
    out = tmp_path / "ollama"
    code, _, err = cli("export", path, "--format", "ollama", "--quant", "Q8_0", "--out", out)
    assert code == 0, err
    modelfile = (out / "Modelfile").read_text()
    assert marker in modelfile and f'PARAMETER stop "{stop}"' in modelfile


# Where llama.cpp departs from transformers on purpose, the tiny configs take the real models' values: llama.cpp
# scales Gemma 2's attention by 1/sqrt(head_dim) as in the 2B/9B releases (query_pre_attn_scalar == head_dim;
# 27B is special-cased by its size), and runs Phi-3 without its sliding window (2047 in the real 4k model, so
# prompts shorter than that are unaffected).
LLAMA_CPP_CONFIGS = {"gemma2": {"query_pre_attn_scalar": 32}, "gemma3": {}, "phi3": {"sliding_window": 64}}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(LLAMA_CPP_CONFIGS))
def test_llama_cpp_runs_the_family_gguf(family, family_gguf):
    """llama.cpp itself reads our gemma2 / gemma3 / phi3 layout (names, metadata, SentencePiece vocabulary) and
    computes what homebake computes: F32 weights, so no activation quantisation; the same tokens, top-1
    agreement and close logits over every position of a chat prompt."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path, _, tokenizer = family_gguf(family, **LLAMA_CPP_CONFIGS[family])
    ours = load_model(path)
    ids = tokenizer.encode_chat(CHAT + [{"role": "assistant", "content": "2 + 2 is 4, I think."}])
    expected = logits_of(ours.model, ids)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, logits_all=True, verbose=False, n_threads=1)
    assert llm.tokenize(TEXTS[0].encode(), add_bos=False, special=True) == tokenizer.encode(TEXTS[0])
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)[:, : expected.shape[1]]
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    assert agreement >= 0.9, agreement
    assert (got - expected).abs().max().item() < 1e-2 * max(1.0, expected.abs().max().item())
