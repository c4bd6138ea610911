"""Encoding with the model's own chat template: trained-token masks for the SmolLM2/ChatML, Llama 3,
Qwen2.5 and Mistral templates, checked by hand and against transformers' assistant-token masks."""

from __future__ import annotations

import pytest
from chat_fixtures import MARKED_TEMPLATES, family_tokenizer, hf_tokenizer

from homebake.data.encode import Encoder
from homebake.data.formats import Conversation, RecordError

SYSTEM = {"role": "system", "content": "Be brief."}
TWO_TURNS = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hello there!"},
             {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye."}]


def conv(messages, tools=None):
    return Conversation(list(messages), "test:1", "messages", tools=tools)


def trained_spans(tokenizer, encoded):
    """Decoded runs of consecutive trained tokens."""
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


# Hand-verified: each reply and its end-of-turn token are trained; role headers, the newline after the
# end-of-turn token, system prompts (including a template's default one) and user turns are not.
HAND_VERIFIED = {
    "smollm2": ["Hello there!<|im_end|>", "Goodbye.<|im_end|>"],
    "llama3": ["Hello there!<|eot_id|>", "Goodbye.<|eot_id|>"],
    "qwen2.5": ["Hello there!<|im_end|>", "Goodbye.<|im_end|>"],
    "mistral": [" Hello there!</s>", " Goodbye.</s>"],  # the template writes " " + reply + eos
}


@pytest.mark.parametrize("family", sorted(HAND_VERIFIED))
@pytest.mark.parametrize("with_system", [False, True])
def test_trained_tokens_match_the_hand_verified_expectation(family, with_system):
    tokenizer = family_tokenizer(family)
    messages = ([SYSTEM] if with_system else []) + TWO_TURNS
    encoded = Encoder(tokenizer)(conv(messages))
    expected = HAND_VERIFIED[family]
    if family == "mistral" and with_system:
        # Mistral v0.3 moves the system prompt into the *last* user turn, so the first reply is rendered
        # differently once the second exists: it cannot be attributed and is left untrained, counted.
        expected = expected[1:]
        assert encoded.unattributed_turns == 1
    assert trained_spans(tokenizer, encoded) == expected
    # The ids are exactly the template's rendering, with at most one BOS.
    assert tokenizer.decode(encoded.ids) == tokenizer.render_chat(messages)
    if tokenizer.bos_token_id is not None and tokenizer.add_bos_token:
        assert encoded.ids[0] == tokenizer.bos_token_id and encoded.ids.count(tokenizer.bos_token_id) == 1
    # The pad token is not the EOS the model must learn to emit.
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


@pytest.mark.parametrize("family", ["smollm2", "llama3", "qwen2.5"])
@pytest.mark.parametrize("with_system", [False, True])
def test_masks_equal_transformers_assistant_masks(family, with_system):
    """Where the template marks replies with {% generation %}, transformers computes the same mask."""
    marked = (MARKED_TEMPLATES / f"{family}-generation.jinja").read_text(encoding="utf-8")
    messages = ([SYSTEM] if with_system else []) + TWO_TURNS
    ours = family_tokenizer(family)
    assert family_tokenizer(family, template=marked).render_chat(messages) == ours.render_chat(messages)
    encoded = Encoder(ours)(conv(messages))
    reference = hf_tokenizer(family, marked).apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert encoded.ids == list(reference["input_ids"])
    assert encoded.mask == [bool(x) for x in reference["assistant_masks"]]


@pytest.mark.parametrize("family", sorted(HAND_VERIFIED))
def test_last_turn_and_everything(family):
    tokenizer = family_tokenizer(family)
    last = Encoder(tokenizer, train_on="last_turn")(conv(TWO_TURNS))
    assert trained_spans(tokenizer, last) == HAND_VERIFIED[family][1:]
    everything = Encoder(tokenizer, train_on="everything")(conv(TWO_TURNS))
    assert all(everything.mask) and everything.ids == last.ids


def test_tool_calls_and_results_with_qwen():
    tokenizer = family_tokenizer("qwen2.5")
    tools = [{"type": "function", "function": {"name": "add", "description": "add", "parameters": {}}}]
    messages = [{"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
                {"role": "tool", "content": "3"},
                {"role": "assistant", "content": "It is 3."}]
    encoded = Encoder(tokenizer)(conv(messages, tools=tools))
    # The generation prompt "<|im_start|>assistant\n" already holds the newline the tool call is rendered after.
    assert trained_spans(tokenizer, encoded) == [
        '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>', "It is 3.<|im_end|>"]
    assert "<tools>" in tokenizer.decode(encoded.ids)  # the tool list is rendered (and not trained)


def test_plain_text_trains_every_token_with_eos_and_one_bos():
    tokenizer = family_tokenizer("llama3")
    text = Conversation([], "t:1", "text", text="The quick brown fox.")
    encoded = Encoder(tokenizer)(text)
    assert encoded.ids[0] == tokenizer.bos_token_id and encoded.ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(encoded.ids[1:-1]) == "The quick brown fox."
    assert all(encoded.mask) and encoded.num_trained == len(encoded.ids) - 1


def test_template_without_end_of_turn_gets_a_trained_eos():
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tokenizer = family_tokenizer("smollm2", template=plain)
    encoded = Encoder(tokenizer)(conv(TWO_TURNS[:2]))
    assert encoded.eos_appended and encoded.ids[-1] == tokenizer.eos_token_id and encoded.mask[-1]
    # This template has no generation prompt, so the reply's role header belongs to the reply.
    assert trained_spans(tokenizer, encoded) == ["assistant: Hello there!\n<|im_end|>"]


def test_max_seq_len_drop_and_truncate():
    tokenizer = family_tokenizer("smollm2")
    full = Encoder(tokenizer)(conv(TWO_TURNS))
    with pytest.raises(RecordError) as caught:
        Encoder(tokenizer, max_seq_len=len(full.ids) - 1)(conv(TWO_TURNS))
    assert caught.value.kind == "too long" and caught.value.where == "test:1"
    cut = Encoder(tokenizer, max_seq_len=len(full.ids) - 3, truncation="truncate")(conv(TWO_TURNS))
    assert cut.ids == full.ids[:-3] and cut.mask == full.mask[:-3] and cut.truncated_tokens == 3
    first_reply_starts = full.mask.index(True)
    with pytest.raises(RecordError) as caught:
        Encoder(tokenizer, max_seq_len=first_reply_starts, truncation="truncate")(conv(TWO_TURNS))
    assert caught.value.kind == "no trained tokens" and "max_seq_len" in str(caught.value)


def test_template_errors_are_record_errors():
    tokenizer = family_tokenizer("mistral")
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
                {"role": "assistant", "content": "c"}]
    with pytest.raises(RecordError) as caught:
        Encoder(tokenizer)(conv(messages))
    assert caught.value.kind == "template error" and "alternate" in str(caught.value)
