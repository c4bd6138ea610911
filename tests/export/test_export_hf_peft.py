"""HF folder and PEFT adapter exports, each loaded by its real consumer (transformers, peft)."""

import json

import pytest
import torch

from .conftest import logits_of, merged_reference

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
TEXT_IDS = list(range(5, 60, 3))


def test_merged_hf_folder_loads_in_transformers(cli, lora_run, tmp_path):
    out = tmp_path / "merged"
    code, _, err = cli("export", lora_run, "--format", "hf", "--out", out, "--dtype", "fp32")
    assert code == 0, err
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours, tokenizer = merged_reference(lora_run)

    with torch.no_grad():
        theirs = hf_model(torch.tensor([TEXT_IDS])).logits[0]
    torch.testing.assert_close(theirs, logits_of(ours, TEXT_IDS), atol=1e-4, rtol=1e-4)

    rendered = hf_tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert rendered == tokenizer.render_chat(CHAT, add_generation_prompt=True)
    assert hf_tok(rendered, add_special_tokens=True)["input_ids"] == tokenizer.encode_chat(CHAT, add_generation_prompt=True)

    generation = json.loads((out / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    assert set(eos if isinstance(eos, list) else [eos]) == tokenizer.end_token_ids
    assert hf_model.generation_config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id


def test_merge_matches_peft_reference_and_shards(cli, lora_run, tiny_dir, tmp_path):
    """`homebake merge` (the alias) equals PEFT's own merge_and_unload, also when sharded and in bf16."""
    out = tmp_path / "sharded"
    code, _, err = cli("merge", lora_run, "--out", out, "--max-shard-size", "400KB", "--dtype", "bf16")
    assert code == 0, err
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    reference = peft.PeftModel.from_pretrained(base, lora_run).merge_and_unload().eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager",
                                                               dtype=torch.float32).eval()
    assert merged.model.embed_tokens.weight.dtype == torch.float32  # loaded from bf16 storage
    with torch.no_grad():
        expected = reference(torch.tensor([TEXT_IDS])).logits[0]
        got = merged(torch.tensor([TEXT_IDS])).logits[0]
    # bf16 storage: relative error ~2^-8 per weight
    assert (got - expected).abs().max() < 0.05 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9


def test_peft_export_loads_in_peft_with_identical_logits(cli, lora_run, tiny_dir, tmp_path):
    out = tmp_path / "adapter"
    code, _, err = cli("export", lora_run, "--format", "peft", "--out", out)
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, attn_implementation="eager").eval()
    model = peft.PeftModel.from_pretrained(base, out).eval()
    ours, _ = merged_reference(lora_run)
    with torch.no_grad():
        theirs = model(torch.tensor([TEXT_IDS])).logits[0]
    torch.testing.assert_close(theirs, logits_of(ours, TEXT_IDS), atol=1e-4, rtol=1e-4)
