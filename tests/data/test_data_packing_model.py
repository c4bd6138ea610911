"""Packed batches through the real decoder: logits and loss equal those of the examples run one by one."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from chat_fixtures import family_tokenizer
from tiny_models import tiny_hf_config

from homebake.data import DataConfig, prepare_dataset
from homebake.data.pack import collate, pack_rows
from homebake.model.args import ModelArgs
from homebake.model.decoder import CausalLM
from homebake.train.loss import chunked_cross_entropy, shift_targets

TOLERANCE = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads only contend


@pytest.fixture(scope="module")
def encoded_examples(tmp_path_factory):
    """Real encoded conversations of different lengths and turn counts (SmolLM2 template)."""
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    words = "the quick brown fox jumps over the lazy dog".split()
    records = []
    for i in range(7):
        messages = [{"role": "system", "content": "Be brief."}] if i % 2 else []
        for turn in range(1 + i % 3):
            messages += [{"role": "user", "content": " ".join(words[: 2 + (i + turn) % 7])},
                         {"role": "assistant", "content": " ".join(words[(i + turn) % 5:])}]
        records.append({"messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = family_tokenizer("smollm2")
    prepared = prepare_dataset(DataConfig(paths=[str(path)], validation_fraction=0), tokenizer)
    assert len(prepared.train) == 7
    return prepared.train, tokenizer.pad_token_id


def build_model(variant: str, vocab_size: int) -> CausalLM:
    args = ModelArgs.from_hf_config(tiny_hf_config(variant, vocab_size=vocab_size, max_position_embeddings=512))
    torch.manual_seed(0)
    model = CausalLM(args).float().eval()
    with torch.no_grad():  # O(1) random weights so that any cross-example leak shows in the logits
        for name, param in model.named_parameters():
            param.copy_(1.0 + 0.2 * torch.randn_like(param) if name.endswith("norm.weight")
                        else torch.randn_like(param) / param.shape[-1] ** 0.5)
    return model


@pytest.mark.parametrize("variant", ["llama", "qwen2", "mistral_window"])
def test_packed_logits_and_loss_equal_one_by_one(encoded_examples, variant):
    examples, pad_id = encoded_examples
    model = build_model(variant, vocab_size=512)
    lengths = [len(e.ids) for e in examples]
    rows = pack_rows(lengths, max(lengths) * 3)
    assert any(len(row) > 1 for row in rows)  # some rows really hold several examples
    batch = collate(examples, rows, pad_id)

    with torch.no_grad():
        hidden = model(batch.input_ids, batch.position_ids)
        packed_logits = model.logits(hidden)
        packed_sum, packed_count = chunked_cross_entropy(hidden, shift_targets(batch.labels, batch.position_ids),
                                                         model.head_weight)
        reference_sum, reference_count = torch.zeros(()), 0
        for r, row in enumerate(rows):
            start = 0
            for i in row:
                ids = torch.tensor(examples[i].ids)
                alone = model.logits(model(ids[None]))[0]
                end = start + len(ids)
                assert (packed_logits[r, start:end] - alone).abs().max() <= TOLERANCE
                start = end
                mask = torch.tensor(examples[i].mask[1:])
                reference_sum += F.cross_entropy(alone[:-1][mask], ids[1:][mask], reduction="sum")
                reference_count += int(mask.sum())
    assert packed_count == reference_count == batch.num_trained_tokens
    assert abs(packed_sum / packed_count - reference_sum / reference_count) <= TOLERANCE


def test_padding_does_not_change_real_logits(encoded_examples):
    examples, pad_id = encoded_examples
    model = build_model("llama", vocab_size=512)
    short, long = sorted(examples, key=lambda e: len(e.ids))[0], sorted(examples, key=lambda e: len(e.ids))[-1]
    batch = collate([short, long], [[0], [1]], pad_id)
    assert (batch.input_ids[0] == pad_id).sum() == len(long.ids) - len(short.ids)
    with torch.no_grad():
        padded = model.logits(model(batch.input_ids, batch.position_ids))[0, :len(short.ids)]
        alone = model.logits(model(torch.tensor(short.ids)[None]))[0]
    assert (padded - alone).abs().max() <= TOLERANCE
