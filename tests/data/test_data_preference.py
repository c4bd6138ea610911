"""Preference pairs: the formats, their errors, encoding (only replies trained), pair packing, data check."""

from __future__ import annotations

import json

import pytest
import torch
from chat_fixtures import family_tokenizer, write_tokenizer_folder
from tiny_models import tiny_hf_config

from homebake.cli import main
from homebake.data import DataConfig, prepare_dataset
from homebake.data.encode import EncodedPair, Encoder
from homebake.data.formats import RecordError, SkipLog, load_conversations, parse_record
from homebake.data.pack import collate_pairs, pair_row_groups
from homebake.model.args import ModelArgs
from homebake.model.decoder import CausalLM
from homebake.train.loss import shift_targets
from homebake.train.objectives import sequence_logps

pytestmark = pytest.mark.usefixtures("one_thread")

USER = {"role": "user", "content": "What is the capital of France?"}
GOOD = {"role": "assistant", "content": "Paris."}
BAD = {"role": "assistant", "content": "Lyon, I think."}


def write(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.mark.parametrize("record", [
    {"prompt": USER["content"], "chosen": "Paris.", "rejected": "Lyon, I think."},
    {"prompt": [USER], "chosen": [GOOD], "rejected": [BAD]},
    {"prompt": USER["content"], "chosen": [GOOD], "rejected": [BAD]},
    {"chosen": [USER, GOOD], "rejected": [USER, BAD]},  # implicit prompt: the shared leading turns
    {"prompt": [USER], "chosen": [USER, GOOD], "rejected": [USER, BAD]},  # the prompt repeated in the replies
])
def test_every_shape_is_the_same_pair(record):
    pair = parse_record(record, "auto", "f.jsonl:1")
    assert pair.format == "preference" and pair.is_pair and pair.prompt_turns == 1
    assert pair.messages == [USER, GOOD] and pair.rejected == [USER, BAD]


def test_system_field_and_multi_turn_prompt():
    prompt = [USER, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    pair = parse_record({"system": "Be brief.", "prompt": prompt, "chosen": "Rome.", "rejected": "Milan."}, "auto", "s")
    assert pair.messages[0] == {"role": "system", "content": "Be brief."} and pair.prompt_turns == 4
    assert pair.messages[-1]["content"] == "Rome." and pair.rejected[-1]["content"] == "Milan."


@pytest.mark.parametrize("record, kind", [
    ({"chosen": "Paris.", "rejected": "Lyon."}, "missing field"),  # text replies need a prompt
    ({"prompt": "q", "chosen": "", "rejected": "Lyon."}, "empty assistant content"),
    ({"prompt": "q", "chosen": "Paris.", "rejected": "Paris."}, "identical replies"),
    ({"chosen": [GOOD], "rejected": [BAD]}, "no prompt"),
    ({"chosen": [USER, GOOD], "rejected": [USER]}, "no reply"),
    ({"prompt": "q", "chosen": [USER], "rejected": [BAD]}, "no assistant turn"),
    ({"prompt": "q", "chosen": {"text": "Paris."}, "rejected": "Lyon."}, "wrong type"),
    ({"prompt": "q", "chosen": [{"role": "bot", "content": "x"}], "rejected": "Lyon."}, "unknown role"),
])
def test_bad_pairs_are_record_errors(record, kind):
    with pytest.raises(RecordError) as error:
        parse_record(record, "auto", "f.jsonl:7")
    assert error.value.kind == kind and error.value.where == "f.jsonl:7"


def test_bad_lines_are_skipped_with_file_and_line(tmp_path):
    path = write(tmp_path / "p.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b"}, "{oops",
                                        {"prompt": "q", "chosen": "a", "rejected": "a"}])
    log = SkipLog()
    loaded = load_conversations([str(path)], log=log)
    assert loaded.formats[str(path)] == "preference" and len(loaded.conversations) == 1
    assert [str(item).split(": ")[0] for item in log.items] == [f"{path}:2", f"{path}:3"]


def test_only_the_replies_are_trained_and_the_prompt_is_shared():
    tokenizer = family_tokenizer("smollm2")
    prompt = [USER, {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    pair = parse_record({"prompt": prompt, "chosen": "Rome.", "rejected": "Milan, I think."}, "auto", "s")
    for train_on in ("all_assistant", "everything"):  # train_on does not apply to pairs
        encoded = Encoder(tokenizer, train_on=train_on)(pair)
        assert isinstance(encoded, EncodedPair)
        p = encoded.prompt_tokens
        assert encoded.chosen.ids[:p] == encoded.rejected.ids[:p] == tokenizer.encode_chat(
            pair.messages[:3], add_generation_prompt=True)
        for side, reply in ((encoded.chosen, "Rome."), (encoded.rejected, "Milan, I think.")):
            assert not any(side.mask[:p])  # nothing of the prompt, not even its earlier assistant turn
            trained = [i for i, m in zip(side.ids, side.mask) if m]
            assert tokenizer.decode(trained) == reply + "<|im_end|>"


def test_too_long_side_names_the_side():
    tokenizer = family_tokenizer("smollm2")
    pair = parse_record({"prompt": "q", "chosen": "ok", "rejected": "word " * 200}, "auto", "f:3")
    with pytest.raises(RecordError) as error:
        Encoder(tokenizer, max_seq_len=64)(pair)
    assert error.value.kind == "too long" and error.value.detail.startswith("rejected: ")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    words = "the quick brown fox jumps over the lazy dog".split()
    records = [{"prompt": " ".join(words[:2 + i % 6]), "chosen": " ".join(words[i % 4:]),
                "rejected": " ".join(words[:1 + i % 7])} for i in range(9)]
    path = write(tmp_path_factory.mktemp("pairs") / "p.jsonl", records)
    tokenizer = family_tokenizer("smollm2")
    prepared = prepare_dataset(DataConfig(paths=[str(path)], validation_fraction=0), tokenizer)
    assert len(prepared.train) == 9 and all(isinstance(e, EncodedPair) for e in prepared.train)
    return prepared.train, tokenizer


def test_pair_rows_keep_pairs_whole_and_number_their_sequences(pairs):
    examples, tokenizer = pairs
    rows = pair_row_groups(examples, max_seq_len=400, packing=True, seed=1)
    assert sorted(i for row in rows for i in row) == list(range(9)) and any(len(row) > 1 for row in rows)
    batch = collate_pairs(examples, rows, tokenizer.pad_token_id)
    assert batch.num_pairs == 9 and batch.num_trained_tokens == sum(e.num_trained for e in examples)
    order = [i for row in rows for i in row]
    for j, index in enumerate(order):
        for side, encoded in ((0, examples[index].chosen), (1, examples[index].rejected)):
            where = batch.sequence_ids == 2 * j + side
            assert int(where.sum()) == len(encoded.ids)
            assert batch.input_ids[where].tolist() == encoded.ids
    assert int((batch.sequence_ids == -1).sum()) == batch.input_ids.numel() - batch.num_real_tokens
    one_each = pair_row_groups(examples, max_seq_len=400, packing=False)
    assert sorted(len(row) for row in one_each) == [1] * 9


def test_packed_pair_log_probs_equal_each_sequence_alone(pairs):
    """Chosen and rejected share a row, packed with other pairs: each one's log-prob equals it run alone."""
    examples, tokenizer = pairs
    args = ModelArgs.from_hf_config(tiny_hf_config("llama", vocab_size=512, max_position_embeddings=512))
    torch.manual_seed(0)
    model = CausalLM(args).float().eval()
    rows = pair_row_groups(examples, max_seq_len=400, packing=True)
    batch = collate_pairs(examples, rows, tokenizer.pad_token_id)
    with torch.no_grad():
        hidden = model(batch.input_ids, position_ids=batch.position_ids)
        sums, counts = sequence_logps(hidden, shift_targets(batch.labels, batch.position_ids), batch.sequence_ids,
                                      model.head_weight, 2 * batch.num_pairs, chunk_rows=7)
        order = [i for row in rows for i in row]
        for j, index in enumerate(order):
            for side, encoded in ((0, examples[index].chosen), (1, examples[index].rejected)):
                ids = torch.tensor([encoded.ids])
                logps = torch.log_softmax(model.logits(model(ids))[0, :-1].float(), dim=-1)
                mask = torch.tensor(encoded.mask[1:])
                alone = logps.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)[mask].sum()
                assert torch.allclose(sums[2 * j + side], alone, atol=1e-4), (index, side)
                assert int(counts[2 * j + side]) == int(mask.sum())


def test_data_check_shows_pairs(tmp_path, capsys):
    model_dir = write_tokenizer_folder(tmp_path / "tok", "smollm2")
    path = write(tmp_path / "p.jsonl", [{"prompt": "Capital of France?", "chosen": "Paris.", "rejected": "Lyon."},
                                        {"chosen": [USER, GOOD], "rejected": [USER, BAD]}, "{bad"])
    code = main(["data", "check", str(path), "--model", str(model_dir), "--preview", "1", "--color", "never"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"{path}  format: preference" in out
    assert "Pairs: 2 preference pairs" in out and "chosen reply tokens:" in out and "rejected reply tokens:" in out
    assert "Tokens per pair (chosen + rejected)" in out
    assert f"{path}:3: invalid JSON" in out
    assert "chosen: [[Paris.<|im_end|>]]" in out and "rejected: [[Lyon.<|im_end|>]]" in out
