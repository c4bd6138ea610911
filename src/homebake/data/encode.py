"""Conversation -> token ids + loss mask, using the model's own chat template.

The mask comes from rendering the conversation prefix by prefix: for each trained assistant turn k,
``render(messages[:k], add_generation_prompt=True)`` ends where the reply starts and
``render(messages[:k+1])`` ends where it stops. Both are tokenized and compared with the tokens of the
whole conversation (longest common prefix), so any template works and the ids are exactly the ones the
model sees at inference. The trained span runs up to and including the turn's end-of-turn token
(``<|im_end|>``, ``<|eot_id|>``, ``</s>`` ...); what a template writes after it (a newline) is not trained.

Plain text (continued pre-training) is ``[BOS] + text + EOS`` with every token trained.

A preference pair (``Conversation.is_pair``) becomes an `EncodedPair`: prompt + chosen and prompt + rejected,
each encoded as above, with only the assistant turns *after* the shared prompt trained (whatever ``train_on``
says): the prompt is the same rendered tokens on both sides, and only the replies and their end-of-turn count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import TemplateError
from .formats import Conversation, RecordError


@dataclass
class Encoded:
    """One example ready for packing: ``mask[i]`` is True where token ``ids[i]`` is learned."""

    ids: list[int]
    mask: list[bool]
    source: str
    messages: int = 0  # turns in the conversation (0 for plain text)
    trained_turns: int = 0  # assistant turns with trained tokens
    unattributed_turns: int = 0  # assistant turns left untrained because the template re-renders them
    truncated_tokens: int = 0  # tokens cut by truncation: truncate
    eos_appended: bool = False  # the template wrote no end-of-turn token after the last reply; EOS added

    @property
    def num_trained(self) -> int:
        return sum(self.mask[1:])  # nothing predicts the first token


@dataclass
class EncodedPair:
    """A preference pair ready for packing: ``chosen`` and ``rejected`` each hold the prompt and one reply.

    ``prompt_tokens`` is the length of the token prefix both sides share (the rendered prompt). The
    properties below describe the pair as one unit (both sequences go through the model together), so
    code that counts tokens over examples works on pairs too.
    """

    chosen: Encoded
    rejected: Encoded
    source: str
    prompt_tokens: int = 0

    @property
    def ids(self) -> list[int]:
        return self.chosen.ids + self.rejected.ids

    @property
    def mask(self) -> list[bool]:
        return self.chosen.mask + self.rejected.mask

    @property
    def num_trained(self) -> int:
        return self.chosen.num_trained + self.rejected.num_trained

    @property
    def messages(self) -> int:
        return self.chosen.messages

    @property
    def trained_turns(self) -> int:
        return self.chosen.trained_turns + self.rejected.trained_turns

    @property
    def unattributed_turns(self) -> int:
        return self.chosen.unattributed_turns + self.rejected.unattributed_turns

    @property
    def truncated_tokens(self) -> int:
        return self.chosen.truncated_tokens + self.rejected.truncated_tokens

    @property
    def eos_appended(self) -> bool:
        return self.chosen.eos_appended or self.rejected.eos_appended


class Encoder:
    """Encodes conversations for one tokenizer and one set of data settings; raises RecordError."""

    def __init__(self, tokenizer, *, train_on: str = "all_assistant", max_seq_len: int = 2048,
                 truncation: str = "drop"):
        self.tokenizer = tokenizer
        self.train_on = train_on
        self.max_seq_len = max_seq_len
        self.truncation = truncation
        self.end_ids = set(tokenizer.end_token_ids)

    def __call__(self, conversation: Conversation) -> Encoded | EncodedPair:
        if conversation.is_pair:
            return self._encode_pair(conversation)
        if conversation.is_text:
            ids = self.tokenizer.encode(conversation.text, add_special_tokens=True) + [self.tokenizer.eos_token_id]
            encoded = Encoded(ids, [True] * len(ids), conversation.source)
        else:
            encoded = self._encode_chat(conversation)
        return self._limit_length(encoded)

    # ---------------------------------------------------------------------------------------------

    def _encode_pair(self, conversation: Conversation) -> EncodedPair:
        sides = []
        for name, messages in (("chosen", conversation.messages), ("rejected", conversation.rejected)):
            encoded = self._encode_chat(conversation, messages, first_turn=conversation.prompt_turns)
            try:
                sides.append(self._limit_length(encoded))
            except RecordError as error:
                raise RecordError(error.kind, f"{name}: {error.detail}" if error.detail else name,
                                  where=error.where, fix=error.fix) from None
        chosen, rejected = sides
        # the prompt: the shared tokens before either reply starts (replies may share their first tokens)
        prompt = min([_common_prefix(chosen.ids, rejected.ids)] + [e.mask.index(True) for e in sides])
        return EncodedPair(chosen, rejected, conversation.source, prompt)

    def _encode_chat(self, conversation: Conversation, messages: list[dict] | None = None,
                     first_turn: int = 0) -> Encoded:
        """``messages`` (default: the conversation's); ``first_turn`` > 0: only assistant turns from that
        index on are trained (a preference pair's replies), whatever ``train_on`` says."""
        pair = messages is not None
        messages = conversation.messages if messages is None else messages
        train_on = "all_assistant" if pair else self.train_on
        render_options = {"tools": conversation.tools} if conversation.tools else {}

        def render(prefix: Sequence[dict], generation_prompt: bool) -> str:
            try:
                return self.tokenizer.render_chat(prefix, add_generation_prompt=generation_prompt, **render_options)
            except TemplateError as error:
                raise RecordError("template error", error.message, where=conversation.source,
                                  fix=error.fix or "check the roles and order of the messages") from None

        full_text = render(messages, False)
        ids = self._tokens(full_text)
        encoded = Encoded(ids, [train_on == "everything"] * len(ids), conversation.source,
                          messages=len(messages))
        if train_on == "everything":
            encoded.trained_turns = sum(m["role"] == "assistant" for m in messages)
            return encoded
        turns = [k for k, m in enumerate(messages) if m["role"] == "assistant" and k >= first_turn]
        if train_on == "last_turn":
            turns = turns[-1:]
        for k in turns:
            # Where the reply starts: after the generation prompt; templates whose generation prompt
            # differs from how past replies are rendered fall back to the plain prefix.
            start_text = render(messages[:k], True)
            if not full_text.startswith(start_text):
                start_text = render(messages[:k], False)
            end_text = full_text if k == len(messages) - 1 else render(messages[:k + 1], False)
            end_text = self._without_closing_eos(end_text, full_text)
            if not (full_text.startswith(start_text) and full_text.startswith(end_text)) \
                    or len(end_text) <= len(start_text):
                encoded.unattributed_turns += 1  # the template renders this turn differently later on
                continue
            start = _common_prefix(self._tokens(start_text), ids)
            end = len(ids) if end_text is full_text else _common_prefix(self._tokens(end_text), ids)
            end = self._through_end_token(ids, start, end)
            if end is None:  # no end-of-turn token in the final reply: the model must still learn to stop
                ids.append(self.tokenizer.eos_token_id)
                encoded.mask.append(False)
                encoded.eos_appended = True
                end = len(ids)
            for i in range(start, end):
                encoded.mask[i] = True
            encoded.trained_turns += end > start
        return encoded

    def _without_closing_eos(self, end_text: str, full_text: str) -> str:
        """Templates that close a finished conversation with EOS (Phi-3: ``{% else %}{{ eos_token }}``) render
        a middle turn as a prefix of the whole conversation only without that EOS."""
        eos = self.tokenizer.eos_token
        if eos and not full_text.startswith(end_text) and end_text.endswith(eos) \
                and full_text.startswith(end_text[:-len(eos)]):
            return end_text[:-len(eos)]
        return end_text

    def _tokens(self, text: str) -> list[int]:
        """Token ids of rendered text, with BOS added only if the model wants one and the template did not
        write it (the rule of Tokenizer.encode_chat, so training sees exactly what inference sends)."""
        bos = self.tokenizer.bos_token
        template_wrote_bos = bos is not None and text.startswith(bos)
        return self.tokenizer.encode(text, add_special_tokens=not template_wrote_bos)

    def _through_end_token(self, ids: list[int], start: int, end: int) -> int | None:
        """End of the trained span: just after the span's last end-of-turn token. None when a final reply
        has none; a reply followed by more turns without one is trained as rendered."""
        for i in range(end - 1, start - 1, -1):
            if ids[i] in self.end_ids:
                return i + 1
        return None if end == len(ids) else end

    def _limit_length(self, encoded: Encoded) -> Encoded:
        length = len(encoded.ids)
        if length > self.max_seq_len:
            if self.truncation == "drop":
                raise RecordError("too long", f"{length} tokens > max_seq_len {self.max_seq_len}",
                                  where=encoded.source, fix="raise max_seq_len or set truncation: truncate")
            encoded.truncated_tokens = length - self.max_seq_len
            del encoded.ids[self.max_seq_len:], encoded.mask[self.max_seq_len:]
        if not any(encoded.mask[1:]):
            detail = ("every trained token is past max_seq_len" if encoded.truncated_tokens else
                      "the template leaves no assistant token to learn" if encoded.unattributed_turns else
                      "nothing is trained")
            raise RecordError("no trained tokens", detail, where=encoded.source,
                              fix="raise max_seq_len" if encoded.truncated_tokens else "use train_on: last_turn")
        return encoded


def _common_prefix(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
