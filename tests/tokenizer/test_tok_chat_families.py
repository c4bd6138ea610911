"""Gemma 2/3 and Phi-3/Phi-4-mini chat templates, as the models ship them: what is trained (template-true
masks through the end-of-turn token), which turns end generation, and Gemma 2's refusal of system turns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from homebake.data.encode import Encoder
from homebake.data.formats import Conversation, RecordError
from homebake.tokenizer import Tokenizer

TEMPLATES = Path(__file__).resolve().parents[1] / "fixtures" / "templates"
# family -> (template file, special tokens, bos, eos, end-of-turn token)
FAMILIES = {
    "gemma-2": ("gemma-2-it.jinja", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
                "<end_of_turn>"),
    "gemma-3": ("gemma-3-it.jinja", ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>",
                "<end_of_turn>"),
    "phi-3": ("phi-3-mini-instruct.jinja", ["<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                                            "<|end|>"], "<s>", "<|endoftext|>", "<|end|>"),
    "phi-4-mini": ("phi-4-mini-instruct.jinja", ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>",
                                                 "<|end|>"], None, "<|endoftext|>", "<|end|>"),
}
CHAT = [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"},
        {"role": "user", "content": "Another one"}, {"role": "assistant", "content": "Green"}]


def family_tokenizer(folder: Path, family: str) -> Tokenizer:
    template, specials, bos, eos, _ = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    backend.save(str(folder / "tokenizer.json"))
    config = {"eos_token": eos, "bos_token": bos, "add_bos_token": bos is not None,
              "chat_template": (TEMPLATES / template).read_text(encoding="utf-8")}
    if "<pad>" in specials:
        config["pad_token"] = "<pad>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return Tokenizer.from_hf_dir(folder)


def trained_spans(tokenizer: Tokenizer, messages) -> list[str]:
    encoded = Encoder(tokenizer)(Conversation(messages=messages, source="t.jsonl:1", format="messages"))
    spans, current = [], []
    for token, trained in zip(encoded.ids, encoded.mask):
        if trained:
            current.append(token)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    if current:
        spans.append(tokenizer.decode(current))
    return spans


@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_reply_is_trained_through_its_end_of_turn_token(family, tmp_path):
    tokenizer = family_tokenizer(tmp_path, family)
    end = FAMILIES[family][4]
    spans = trained_spans(tokenizer, CHAT)
    assert len(spans) == 2, spans
    assert spans[0] == f"Blue{end}"
    # Phi-3 closes a finished conversation with EOS after the last <|end|>: trained too, as rendered
    assert spans[1] in (f"Green{end}", f"Green{end}\n{tokenizer.eos_token}", f"Green{end}{tokenizer.eos_token}")
    assert tokenizer.token_to_id(end) in tokenizer.end_token_ids
    assert tokenizer.pad_token_id != tokenizer.eos_token_id or "<pad>" not in FAMILIES[family][1]


def test_generation_prompt_opens_the_model_turn(tmp_path):
    gemma = family_tokenizer(tmp_path / "g", "gemma-3")
    text = gemma.render_chat(CHAT[:1], add_generation_prompt=True)
    assert text == "<bos><start_of_turn>user\nName a colour<end_of_turn>\n<start_of_turn>model\n"
    ids = gemma.encode_chat(CHAT[:1], add_generation_prompt=True)
    assert ids.count(gemma.bos_token_id) == 1  # the template writes BOS; encode_chat adds no second one
    phi = family_tokenizer(tmp_path / "p", "phi-3")
    assert phi.render_chat(CHAT[:1], add_generation_prompt=True) == "<|user|>\nName a colour<|end|>\n<|assistant|>\n"


def test_gemma2_refuses_a_system_turn_gemma3_folds_it_into_the_first_user_turn(tmp_path):
    system = [{"role": "system", "content": "Be terse."}, *CHAT[:2]]
    gemma2 = family_tokenizer(tmp_path / "g2", "gemma-2")
    with pytest.raises(RecordError, match="System role not supported"):
        Encoder(gemma2)(Conversation(messages=system, source="t.jsonl:3", format="messages"))
    gemma3 = family_tokenizer(tmp_path / "g3", "gemma-3")
    assert gemma3.render_chat(system).startswith("<bos><start_of_turn>user\nBe terse.\n\nName a colour")
    assert trained_spans(gemma3, system) == ["Blue<end_of_turn>"]
    phi = family_tokenizer(tmp_path / "p", "phi-3")
    assert trained_spans(phi, system)[0].startswith("Blue<|end|>")
