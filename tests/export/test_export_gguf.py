"""GGUF export: our own loader reads every type back; metadata is what llama.cpp needs; GGUF in, GGUF out."""

import math

import pytest
import torch

from homebake.export.gguf import QUANT_TYPES, choose_tensor_type
from homebake.model.gguf_file import read_gguf
from homebake.model.load import load_model

from .conftest import logits_of, make_adapter, merged_reference

TEXT_IDS = [(7 * i * i + 3 * i) % 300 for i in range(96)]
# RMS logit error / RMS logit allowed per type. A random O(1)-weight model amplifies weight noise far more
# than a trained one, so these are loose; they still order the types by bits and catch layout bugs
# (a wrong block layout or Q/K permutation gives errors of order 1).
TOLERANCE = {"F32": 1e-6, "F16": 3e-3, "BF16": 2e-2, "Q8_0": 4e-2, "Q6_K": 0.12, "Q5_1": 0.25, "Q5_0": 0.25,
             "Q5_K_M": 0.25, "Q4_1": 0.5, "Q4_0": 0.5, "Q4_K_M": 0.5}


def relative_error(got, expected) -> float:
    return ((got - expected).pow(2).mean().sqrt() / expected.pow(2).mean().sqrt()).item()


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]))
    return math.exp(nll.item())


def export_gguf(cli, source, out, quant):
    code, _, err = cli("export", source, "--format", "gguf", "--quant", quant, "--out", out)
    assert code == 0, err
    (path,) = out.glob("*.gguf")
    return path


@pytest.fixture(scope="module")
def reference(lora_run):
    from homebake.sources import open_source

    source = open_source(lora_run)
    state = source.merged_state_dict()
    source.loaded.model.load_state_dict(state)
    return source, state, logits_of(source.loaded.model, TEXT_IDS)


@pytest.mark.parametrize("quant", QUANT_TYPES)
def test_every_type_reads_back_with_close_logits(quant, reference, tmp_path):
    from homebake.export.gguf import tokenizer_gguf_metadata, write_model_gguf

    source, state, expected = reference
    path = tmp_path / f"m-{quant}.gguf"
    write_model_gguf(path, state, source.loaded.args, tokenizer_metadata=tokenizer_gguf_metadata(source.loaded.tokenizer),
                     quant=quant)
    got = logits_of(load_model(str(path)).model, TEXT_IDS)
    error = relative_error(got, expected)
    print(f"{quant}: relative RMS logit error {error:.2e}, perplexity {perplexity(got, TEXT_IDS):.3f} "
          f"(fp32 {perplexity(expected, TEXT_IDS):.3f})")
    assert error <= TOLERANCE[quant]


def test_metadata_and_tensor_types(cli, lora_run, reference, tmp_path):
    tokenizer = reference[0].loaded.tokenizer
    path = export_gguf(cli, lora_run, tmp_path / "q4km", "q4_k_m")
    contents = read_gguf(path)
    meta, types = contents.metadata, contents.tensor_types
    expected = tokenizer.to_gguf_metadata()
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.pre",
                "tokenizer.ggml.eos_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template"):
        value = meta[key]
        if key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):  # padded to the 320 embedding rows
            assert len(value) == 320 and value[len(expected[key]):] == (
                [f"[PAD{i}]" for i in range(len(expected[key]), 320)] if key.endswith("tokens")
                else [5] * (320 - len(expected[key])))
            value = value[:len(expected[key])]
        assert value == expected[key], key
    assert meta["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert meta["tokenizer.ggml.eos_token_id"] == tokenizer.token_to_id("<|im_end|>")
    assert meta["llama.context_length"] == 512
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 15  # MOSTLY_Q4_K_M
    # llama.cpp's Q4_K_M mix: output Q6_K, attn_v/ffn_down Q6_K in "more bits" layers, norms F32
    assert types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "Q4_K"
    assert (types["blk.0.attn_v.weight"], types["blk.1.attn_v.weight"]) == ("Q4_K", "Q6_K")
    assert (types["blk.0.ffn_down.weight"], types["blk.1.ffn_down.weight"]) == ("Q4_K", "Q6_K")
    assert types["blk.0.attn_q.weight"] == "Q4_K" and types["blk.0.attn_norm.weight"] == "F32"


def test_mix_rules_for_smollm2_shapes():
    """Hidden 576 is no multiple of 256: K-quants fall back as llama.cpp does; tied output -> Q8_0."""
    kw = dict(n_layers=30, tied=True)
    assert choose_tensor_type("token_embd.weight", (49152, 576), "Q4_K_M", **kw) == "Q8_0"
    assert choose_tensor_type("blk.3.attn_q.weight", (576, 576), "Q4_K_M", **kw) == "Q5_0"
    assert choose_tensor_type("blk.0.attn_v.weight", (192, 576), "Q4_K_M", **kw) == "Q8_0"  # Q6_K -> Q8_0
    assert choose_tensor_type("blk.3.ffn_down.weight", (576, 1536), "Q4_K_M", **kw) == "Q4_K"
    assert choose_tensor_type("blk.0.ffn_down.weight", (576, 1536), "Q4_K_M", **kw) == "Q6_K"
    assert choose_tensor_type("blk.3.attn_q.weight", (576, 576), "Q5_K_M", **kw) == "Q5_1"
    assert choose_tensor_type("blk.3.attn_q.weight", (576, 576), "Q6_K", **kw) == "Q8_0"
    assert choose_tensor_type("blk.3.attn_norm.weight", (576,), "Q4_K_M", **kw) == "F32"
    assert choose_tensor_type("blk.3.attn_q.weight", (576, 576), "Q4_0", **kw) == "Q4_0"
    more_bits = [i for i in range(32) if choose_tensor_type(f"blk.{i}.attn_v.weight", (1024, 4096), "Q4_K_M",
                                                            n_layers=32, tied=False) == "Q6_K"]
    assert more_bits == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


def test_gguf_in_gguf_out_without_hf_folder(cli, tiny_dir, tmp_path):
    """A base that exists only as GGUF, an adapter trained on it, exported to GGUF again."""
    base = export_gguf(cli, tiny_dir, tmp_path / "base", "F32")
    run = make_adapter(base, tmp_path / "run")
    model, _ = merged_reference(run)
    expected = logits_of(model, TEXT_IDS)
    path = export_gguf(cli, run, tmp_path / "out", "Q8_0")
    got = logits_of(load_model(str(path)).model, TEXT_IDS)
    assert relative_error(got, expected) < TOLERANCE["Q8_0"]
    assert read_gguf(path).metadata["tokenizer.chat_template"] == read_gguf(base).metadata["tokenizer.chat_template"]


def test_unknown_quant_lists_supported(cli, lora_run, tmp_path):
    code, _, err = cli("export", lora_run, "--format", "gguf", "--quant", "Q3_K_S", "--out", tmp_path / "x")
    assert code != 0
    assert "Q3_K_S" in err and "Q4_K_M" in err and "Q8_0" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


PPL_TEXT = ("The sun rises in the east and sets in the west. Water boils at one hundred degrees Celsius at sea "
            "level. Paris is the capital of France, and Rome is the capital of Italy. A week has seven days, and "
            "a year has twelve months. Cats and dogs are common pets in many homes around the world.")


@pytest.mark.default_model
@pytest.mark.slow
def test_default_model_exports_with_close_perplexity(cli, default_gguf, tmp_path):
    """The default model (Q4_1 GGUF) -> Q8_0 and Q4_K_M GGUF: same tokenizer metadata, close perplexity."""
    original = load_model(str(default_gguf))
    ids = original.tokenizer.encode(PPL_TEXT)
    a = logits_of(original.model, ids)
    del original
    source = read_gguf(default_gguf).metadata
    for quant, max_increase, min_agreement in (("Q8_0", 0.02, 0.95), ("Q4_K_M", 0.2, 0.8)):
        path = export_gguf(cli, default_gguf, tmp_path / quant, quant)
        exported = read_gguf(path).metadata
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.pre", "tokenizer.chat_template",
                    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.add_bos_token", "llama.context_length"):
            assert exported[key] == source[key], key
        b = logits_of(load_model(str(path)).model, ids)
        agreement = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
        print(f"default model {quant}: perplexity {perplexity(b, ids):.3f} vs source {perplexity(a, ids):.3f}, "
              f"top-1 agreement {agreement:.3f}")
        assert agreement > min_agreement
        assert perplexity(b, ids) / perplexity(a, ids) - 1 < max_increase
