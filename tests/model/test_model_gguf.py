"""GGUF: our writer -> our reader round trips every architecture; transformers reads what we write; K-quants
and Q/K permutation agree with transformers' GGUF loader; damaged files are one-line errors."""

from __future__ import annotations

import copy
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize
from tiny_models import ARCH_VARIANTS, save_tiny_hf_model

from homebake.errors import ExportError, ModelLoadError, UnsupportedArchitectureError
from homebake.export.gguf_writer import WRITABLE_TYPES, write_gguf
from homebake.model.gguf_file import permute_qk, read_gguf
from homebake.model.load import load_model

TRANSFORMERS_READS_IT = {"llama", "llama_tied", "qwen2"}  # it ignores GGUF rope scaling and qwen3 key_length


def logits(model, ids):
    with torch.no_grad():
        return model.logits(model(ids))


def export(tiny_dir, variant: str, path: Path, tensor_type: str = "F32", **kwargs) -> Path:
    loaded = load_model(tiny_dir(variant), with_tokenizer=False)
    return write_gguf(path, loaded.model.state_dict(), loaded.args, tensor_type=tensor_type, **kwargs)


def quantised_reference(hf_model, tensor_type: str):
    """The transformers model with every matrix rounded through ``tensor_type`` exactly as our writer stores it."""
    model = copy.deepcopy(hf_model)
    qtype = gguf.GGMLQuantizationType[tensor_type]
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 2:
                array = param.numpy()
                if tensor_type == "F16" or array.shape[-1] % block:
                    rounded = array.astype(np.float16).astype(np.float32)
                else:
                    rounded = dequantize(quantize(array, qtype), qtype)
                param.copy_(torch.from_numpy(np.asarray(rounded, dtype=np.float32)))
    return model


@pytest.mark.parametrize("variant", ARCH_VARIANTS + ["mistral_window"])
def test_f32_gguf_round_trip_matches_transformers(variant, tiny_dir, hf_reference, tmp_path, token_ids):
    path = export(tiny_dir, variant, tmp_path / "m.gguf")
    loaded = load_model(path, with_tokenizer=False)
    assert loaded.source_kind == "gguf" and loaded.source_path == path
    original = load_model(tiny_dir(variant), with_tokenizer=False).args
    # Mistral without a window is written as llama.cpp does: architecture "llama"
    expected = original.replace(model_type="llama") if variant == "mistral" else original
    assert loaded.args == expected
    assert (logits(loaded.model, token_ids) - hf_reference(variant)(token_ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("variant", ARCH_VARIANTS)
def test_q8_0_gguf_matches_the_quantised_reference(variant, tiny_dir, hf_reference, tmp_path, token_ids):
    path = export(tiny_dir, variant, tmp_path / "m.gguf", "Q8_0")
    ours = logits(load_model(path, with_tokenizer=False).model, token_ids)
    reference = quantised_reference(hf_reference(variant), "Q8_0")
    with torch.no_grad():
        assert (ours - reference(token_ids).logits).abs().max() <= 1e-4
        # and quantisation really happened: Q8_0 differs measurably from fp32
        assert (ours - hf_reference(variant)(token_ids).logits).abs().max() > 1e-3
    if variant in TRANSFORMERS_READS_IT:  # transformers' own GGUF loader on the same file
        from transformers import AutoModelForCausalLM

        theirs = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                      attn_implementation="eager").eval()
        with torch.no_grad():
            assert (ours - theirs(token_ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("tensor_type", [t for t in WRITABLE_TYPES if t not in ("F32", "Q8_0")])
def test_other_tensor_types_round_trip(tensor_type, tiny_dir, hf_reference, tmp_path, token_ids):
    path = export(tiny_dir, "llama", tmp_path / "m.gguf", tensor_type)
    contents = read_gguf(path)
    expected = "F16" if tensor_type == "F16" else tensor_type
    assert contents.tensor_types["blk.0.attn_q.weight"] == expected
    assert contents.tensor_types["blk.0.attn_norm.weight"] == "F32"  # norms stay F32
    reference_type = "BF16" if tensor_type == "BF16" else tensor_type
    reference = quantised_reference(hf_reference("llama"), reference_type)
    ours = logits(load_model(path, with_tokenizer=False).model, token_ids)
    with torch.no_grad():
        assert (ours - reference(token_ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("variant,permuted", [("llama", True), ("qwen2", False), ("qwen3", False)])
def test_qk_rows_are_permuted_only_for_the_llama_architecture(variant, permuted, tiny_dir, tmp_path):
    path = export(tiny_dir, variant, tmp_path / "m.gguf")
    raw = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(path).tensors}
    hf = load_model(tiny_dir(variant), with_tokenizer=False)
    q = hf.model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    k = hf.model.state_dict()["model.layers.0.self_attn.k_proj.weight"]
    expect_q = permute_qk(q, hf.args.num_attention_heads) if permuted else q
    expect_k = permute_qk(k, hf.args.num_key_value_heads) if permuted else k
    np.testing.assert_array_equal(raw["blk.0.attn_q.weight"], expect_q.numpy())
    np.testing.assert_array_equal(raw["blk.0.attn_k.weight"], expect_k.numpy())
    assert permuted == (not np.array_equal(raw["blk.0.attn_q.weight"], q.numpy()))


def rewrite_gguf(source: Path, target: Path, *, drop=(), metadata=None, tensor_fn=None, add=None) -> Path:
    """Copy a GGUF with gguf's own writer: drop, add or re-encode tensors, override metadata."""
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(target, arch)
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = (metadata or {}).get(key, field.contents())
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            writer.add_key_value(key, value, field.types[0], sub_type=field.types[-1])
        else:
            writer.add_key_value(key, value, field.types[0])
    for tensor in reader.tensors:
        if tensor.name in drop:
            continue
        array, raw_dtype = (tensor_fn or (lambda t: (np.asarray(t.data), None)))(tensor)
        writer.add_tensor(tensor.name, array, raw_dtype=raw_dtype)
    for name, array in (add or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return target


K_QUANTS = [gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.Q5_K, gguf.GGMLQuantizationType.Q6_K]


def random_kquant(tensor, generator: np.random.Generator, counter: list[int]):
    """Random but valid K-quant bytes (finite fp16 scales) for 2-D tensors, cycling the three types."""
    if len(tensor.shape) != 2:
        return np.asarray(tensor.data), None
    qtype = K_QUANTS[counter[0] % 3]
    counter[0] += 1
    block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = int(tensor.shape[1]), int(tensor.shape[0])
    data = generator.integers(0, 256, size=(rows, cols // block, block_bytes), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.004).tobytes(), dtype=np.uint8)
    offsets = [208] if qtype == gguf.GGMLQuantizationType.Q6_K else [0, 2]  # d (and dmin) positions
    for offset in offsets:
        data[:, :, offset:offset + 2] = scale
    return data.reshape(rows, -1), qtype


def test_k_quants_load_like_transformers(tmp_path, token_ids):
    """Q4_K/Q5_K/Q6_K dequantisation, shapes and Q/K un-permutation agree with transformers' GGUF loader."""
    from transformers import AutoModelForCausalLM

    folder = save_tiny_hf_model(tmp_path / "hf", "llama", hidden_size=256, intermediate_size=256,
                                num_hidden_layers=1)
    loaded = load_model(folder, with_tokenizer=False)
    f32 = write_gguf(tmp_path / "f32.gguf", loaded.model.state_dict(), loaded.args)
    generator = np.random.default_rng(0)
    counter = [0]
    path = rewrite_gguf(f32, tmp_path / "k.gguf", tensor_fn=lambda t: random_kquant(t, generator, counter))
    types = set(read_gguf(path).tensor_types.values())
    assert {"Q4_K", "Q5_K", "Q6_K"} <= types
    ours = logits(load_model(path, with_tokenizer=False).model, token_ids)
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="k.gguf", attn_implementation="eager").eval()
    with torch.no_grad():
        reference = theirs(token_ids).logits
    assert (ours - reference).abs().max() <= 1e-4 * max(1.0, reference.abs().max().item())


def test_tokenizer_metadata_is_written_through_with_llama_cpp_types(tiny_dir, tmp_path):
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["<s>", "a", "b"],
        "tokenizer.ggml.token_type": [3, 1, 1],
        "tokenizer.ggml.scores": [0.0, -1.0, -2.0],
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": "{{ messages }}",
    }
    path = export(tiny_dir, "llama", tmp_path / "m.gguf", tokenizer_metadata=metadata)
    fields = gguf.GGUFReader(path).fields
    V = gguf.GGUFValueType
    assert fields["tokenizer.ggml.token_type"].types == [V.ARRAY, V.INT32]
    assert fields["tokenizer.ggml.scores"].types == [V.ARRAY, V.FLOAT32]
    assert fields["tokenizer.ggml.tokens"].types == [V.ARRAY, V.STRING]
    assert fields["tokenizer.ggml.eos_token_id"].types == [V.UINT32]
    assert fields["tokenizer.ggml.bos_token_id"].types == [V.UINT32]  # from the config when not given
    assert fields["tokenizer.ggml.add_bos_token"].types == [V.BOOL]
    read = read_gguf(path).metadata
    for key, value in metadata.items():
        assert read[key][:len(value)] == value if isinstance(value, list) else read[key] == value
    # the vocabulary is padded to the model's 320 embedding rows with unused placeholders, as llama.cpp does
    assert len(read["tokenizer.ggml.tokens"]) == 320 and read["tokenizer.ggml.tokens"][3] == "[PAD3]"
    assert set(read["tokenizer.ggml.token_type"][3:]) == {5} and set(read["tokenizer.ggml.scores"][3:]) == {-10000.0}
    assert read["tokenizer.ggml.eos_token_id"] == 0  # the tokenizer's id wins over the config's


def test_writer_refuses_bad_input_without_touching_existing_output(tiny_dir, tmp_path):
    loaded = load_model(tiny_dir("llama"), with_tokenizer=False)
    target = tmp_path / "m.gguf"
    target.write_bytes(b"previous good file")
    with pytest.raises(ExportError, match="Q3_K"):
        write_gguf(target, loaded.model.state_dict(), loaded.args, tensor_type="Q3_K")
    state = {**loaded.model.state_dict(), "model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64)}
    with pytest.raises(ExportError, match="lora_A"):
        write_gguf(target, state, loaded.args)
    assert target.read_bytes() == b"previous good file"
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"]  # no temporary left behind


# -- damaged or unsupported files: one-line ModelLoadError naming the file -----------------------------


def assert_gguf_error(path: Path, match: str, error=ModelLoadError) -> None:
    with pytest.raises(error) as info:
        load_model(path, with_tokenizer=False)
    text = str(info.value)
    assert "\n" not in text and path.name in text and match in text, text


def test_truncated_gguf(tiny_dir, tmp_path):
    path = export(tiny_dir, "llama", tmp_path / "m.gguf")
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])
    assert_gguf_error(path, "GGUF")


@pytest.mark.parametrize("content", [b"", b"GGUF" + bytes(range(256)) * 4, b"not a gguf file at all" * 10])
def test_corrupt_gguf(tmp_path, content):
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    assert_gguf_error(path, "cannot read GGUF")


def test_gguf_with_unsupported_architecture(tiny_dir, tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "g.gguf", "qwen2moe")  # a mixture-of-experts architecture
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert_gguf_error(tmp_path / "g.gguf", "'qwen2moe' is not supported", UnsupportedArchitectureError)


def test_gguf_missing_tensor(tiny_dir, tmp_path):
    path = export(tiny_dir, "llama", tmp_path / "m.gguf")
    broken = rewrite_gguf(path, tmp_path / "broken.gguf", drop={"blk.1.ffn_up.weight"})
    assert_gguf_error(broken, "'model.layers.1.mlp.up_proj.weight' is missing")


def test_gguf_shape_mismatch(tiny_dir, tmp_path):
    path = export(tiny_dir, "llama", tmp_path / "m.gguf")
    broken = rewrite_gguf(path, tmp_path / "broken.gguf", metadata={"llama.feed_forward_length": 96})
    assert_gguf_error(broken, "the config implies")


def test_gguf_with_unknown_tensor(tiny_dir, tmp_path):
    path = export(tiny_dir, "llama", tmp_path / "m.gguf")
    extra = {"blk.0.ffn_gate_exps.weight": np.zeros((2, 4), dtype=np.float32)}  # an MoE tensor
    broken = rewrite_gguf(path, tmp_path / "moe.gguf", add=extra)
    assert_gguf_error(broken, "unexpected tensor 'blk.0.ffn_gate_exps.weight'")
