"""The model's tokenizer: a HF ``tokenizers.Tokenizer`` plus its special tokens and chat template.

Built from a Hugging Face folder (tokenizer.json + tokenizer_config.json [+ chat_template.jinja]) or from
GGUF metadata (a byte-level BPE rebuilt from ``tokenizer.ggml.*`` with the pre-tokenizer llama.cpp uses
for ``tokenizer.ggml.pre``, or a SentencePiece vocabulary, ``tokenizer.ggml.model = "llama"``, see
homebake/spm.py), and written back to GGUF metadata with ``to_gguf_metadata``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from homebake.chat_template import render_template
from homebake.errors import TemplateError, TokenizerError
from homebake.spm import SpmVocab, is_spm_backend, spm_backend, vocab_from_hf

# GGUF token types (llama.cpp's llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# Tokens that end an assistant turn or a generation in the common template families.
END_TOKEN_NAMES = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "</s>", "<|endoftext|>",
                   "<end_of_turn>", "<|end|>")
# Dedicated padding tokens some vocabularies reserve, tried before falling back to unk.
PAD_TOKEN_NAMES = ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]", "<|padding|>", "<|pad_token|>")
_RESERVED_TOKEN = re.compile(r"<\|reserved_special_token_\d+\|>")


# --- pre-tokenizers, by the name llama.cpp reads from `tokenizer.ggml.pre` -------------------------------

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                 r"|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer: regexes applied in order, each isolating its matches (llama-vocab.cpp)."""

    name: str
    regexes: tuple[str, ...]
    aliases: tuple[str, ...] = ()
    ignore_merges: bool = False  # llama.cpp uses a whole-word vocabulary hit before merging (as HF's Llama 3)
    add_bos_default: bool = False  # llama.cpp's default when the GGUF has no tokenizer.ggml.add_bos_token


PRE_TOKENIZERS = (
    PreTokenizer("smollm", (r"\p{N}", _GPT2_SPLIT)),
    PreTokenizer("llama-bpe", (_LLAMA3_SPLIT,), aliases=("llama3", "llama-v3"), ignore_merges=True,
                 add_bos_default=True),
    PreTokenizer("qwen2", (_QWEN2_SPLIT,)),
    PreTokenizer("gpt-2", (_GPT2_SPLIT,), aliases=("gpt2",)),
    PreTokenizer("default", (r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]")),
)
_PRE_BY_NAME = {name: pre for pre in PRE_TOKENIZERS for name in (pre.name, *pre.aliases)}

# The same splits as models' tokenizer.json spell them (HF's regex engine takes both spellings).
_HF_SPELLINGS = {
    _GPT2_SPLIT + r"|\s+": _GPT2_SPLIT,
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)" + _LLAMA3_SPLIT[len(_CONTRACTIONS):]: _LLAMA3_SPLIT,
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)" + _QWEN2_SPLIT[len(_CONTRACTIONS):]: _QWEN2_SPLIT,
}


def supported_pre_tokenizers() -> list[str]:
    return sorted(_PRE_BY_NAME)


def _pre_tokenizer_for(pre: PreTokenizer) -> pre_tokenizers.PreTokenizer:
    splits = [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in pre.regexes]
    return pre_tokenizers.Sequence([*splits, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _split_regexes(config: Mapping[str, Any] | None) -> tuple[str, ...] | None:
    """The llama.cpp-style regex list a tokenizer.json pre_tokenizer amounts to, or None if it has no such form."""
    if not config:
        return None
    kind = config.get("type")
    if kind == "Sequence":
        parts = [_split_regexes(part) for part in config.get("pretokenizers", [])]
        return None if any(part is None for part in parts) else tuple(r for part in parts for r in part)
    if kind == "ByteLevel":
        if config.get("add_prefix_space"):
            return None
        return (_GPT2_SPLIT,) if config.get("use_regex", True) else ()
    if kind == "Digits" and config.get("individual_digits"):
        return (r"\p{N}",)
    if kind == "Split" and str(config.get("behavior", "")).lower() == "isolated" and not config.get("invert"):
        regex = (config.get("pattern") or {}).get("Regex")
        return (_HF_SPELLINGS.get(regex, regex),) if regex else None
    return None


# --- the tokenizer ----------------------------------------------------------------------------------------

class Tokenizer:
    """Encode/decode text and render the model's chat template; see docs/ARCHITECTURE.md."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token_id: int,
        bos_token_id: int | None = None,
        unk_token_id: int | None = None,
        pad_token_id: int | None = None,
        extra_end_token_ids: Sequence[int] = (),
        add_bos_token: bool = False,
        chat_template: str | None = None,
        chat_template_source: str = "chat template",
        named_chat_templates: Mapping[str, str] | None = None,
        gguf_pre: str | None = None,
        spm: SpmVocab | None = None,
        source: str = "tokenizer",
    ):
        self.backend = backend
        self.source = source
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        self.unk_token_id = unk_token_id
        self.add_bos_token = bool(add_bos_token and bos_token_id is not None)
        self.chat_template = chat_template
        self.chat_template_source = chat_template_source
        # Other templates a tokenizer_config.json may name; HF renders with "tool_use" when tools are given.
        self.named_chat_templates = dict(named_chat_templates or {})
        self.gguf_pre = gguf_pre
        self.spm = spm  # the SentencePiece vocabulary (pieces, scores, types) when read from a GGUF
        self.end_token_ids = self._end_token_ids(extra_end_token_ids)
        self.pad_token_id = self._choose_pad(pad_token_id)

    # Constructors ---------------------------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> Tokenizer:
        """Read tokenizer.json, tokenizer_config.json, chat_template.jinja and generation_config.json."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError("tokenizer.json not found", where=str(tokenizer_file),
                                 fix="homebake needs a fast tokenizer: re-save the model folder with transformers "
                                     "(AutoTokenizer.from_pretrained(src).save_pretrained(dir)) or use its GGUF")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as error:  # the Rust parser reports any malformed content as a plain Exception
            raise TokenizerError(f"tokenizer.json is unreadable: {error}", where=str(tokenizer_file),
                                 fix="re-download the file; it is corrupt or from an unsupported tokenizer") from None
        config_file = folder / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.is_file() else {}
        special_map_file = folder / "special_tokens_map.json"
        special_map = _read_json(special_map_file) if special_map_file.is_file() else {}
        generation_file = folder / "generation_config.json"
        generation = _read_json(generation_file) if generation_file.is_file() else {}

        def token_id(field: str) -> int | None:
            content = _token_content(config.get(field, special_map.get(field)))
            return backend.token_to_id(content) if content is not None else None

        generation_eos = generation.get("eos_token_id")
        generation_eos = [generation_eos] if isinstance(generation_eos, int) else list(generation_eos or [])
        eos = token_id("eos_token")
        eos = eos if eos is not None else (generation_eos[0] if generation_eos else None)
        if eos is None:
            raise TokenizerError("no end-of-sequence token is defined", where=str(config_file),
                                 fix='set "eos_token" in tokenizer_config.json to the token that ends a reply')
        bos = token_id("bos_token")
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # not configured: the tokenizer.json post-processor says whether BOS is prepended
            add_bos = _post_processor_prepends(json.loads(backend.to_str()).get("post_processor"), bos)
        templates, template_source = _hf_chat_templates(folder, config)
        return cls(backend, eos_token_id=eos, bos_token_id=bos, unk_token_id=token_id("unk_token"),
                   pad_token_id=token_id("pad_token"), extra_end_token_ids=generation_eos,
                   add_bos_token=bool(add_bos), chat_template=templates.pop("default", None),
                   chat_template_source=template_source, named_chat_templates=templates, source=str(folder))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], *, source: str | os.PathLike | None = None) -> Tokenizer:
        """Rebuild the byte-level BPE tokenizer stored in GGUF metadata (``tokenizer.ggml.*``).

        ``source`` (the GGUF path) only names the file in errors.
        """
        where = f"{source} metadata" if source else "GGUF metadata"

        def field(key: str, default: Any = None, required: bool = False) -> Any:
            if key not in metadata or metadata[key] is None:
                if required:
                    raise TokenizerError(f"'{key}' is missing", where=where,
                                         fix="the GGUF file has no usable tokenizer; re-convert it with llama.cpp's "
                                             "convert_hf_to_gguf.py, or load the original HF folder instead")
                return default
            return metadata[key]

        model = field("tokenizer.ggml.model", required=True)
        if model not in ("gpt2", "llama"):
            raise TokenizerError(f"tokenizer model '{model}' is not supported (supported: 'gpt2', byte-level BPE; "
                                 f"'llama', SentencePiece)", where=f"{where} 'tokenizer.ggml.model'",
                                 fix="load the model from its Hugging Face folder (tokenizer.json) instead")
        tokens = [str(token) for token in field("tokenizer.ggml.tokens", required=True)]
        if not tokens:
            raise TokenizerError("'tokenizer.ggml.tokens' is empty", where=where,
                                 fix="re-convert the model with llama.cpp's convert_hf_to_gguf.py")
        token_types = list(field("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens)))
        if len(token_types) != len(tokens):
            raise TokenizerError(f"{len(token_types)} token types for {len(tokens)} tokens",
                                 where=f"{where} 'tokenizer.ggml.token_type'", fix="re-convert the model")
        spm = None
        if model == "llama":
            scores = [float(s) for s in field("tokenizer.ggml.scores", [0.0] * len(tokens))]
            if len(scores) != len(tokens):
                raise TokenizerError(f"{len(scores)} scores for {len(tokens)} tokens",
                                     where=f"{where} 'tokenizer.ggml.scores'", fix="re-convert the model")
            arch = str(field("general.architecture", ""))
            spm = SpmVocab(tokens, scores, [int(t) for t in token_types],
                           add_space_prefix=bool(field("tokenizer.ggml.add_space_prefix", True)),
                           merges_by_position=arch.startswith("gemma"))
            try:
                backend = spm_backend(spm)
            except Exception as error:
                raise TokenizerError(f"the SentencePiece vocabulary does not form a tokenizer: {error}",
                                     where=f"{where} 'tokenizer.ggml.tokens'", fix="re-convert the model") from None
            pre = PreTokenizer("default", ())
        else:
            backend, pre = cls._bpe_backend(field, tokens, token_types, where)

        def token_id(key: str) -> int | None:
            value = field(key)
            if value is None:
                return None
            if not 0 <= int(value) < len(tokens):
                raise TokenizerError(f"'{key}' = {value} is outside the vocabulary of {len(tokens)}", where=where,
                                     fix="re-convert the model")
            return int(value)

        eos = token_id("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise TokenizerError("'tokenizer.ggml.eos_token_id' is missing", where=where,
                                 fix="re-convert the model with llama.cpp's convert_hf_to_gguf.py")
        extra_ends = [i for i in (token_id("tokenizer.ggml.eot_token_id"), token_id("tokenizer.ggml.eom_token_id"))
                      if i is not None]
        # llama.cpp adds BOS to SentencePiece vocabularies unless the file says otherwise
        add_bos_default = True if spm is not None else pre.add_bos_default
        return cls(backend, eos_token_id=eos, bos_token_id=token_id("tokenizer.ggml.bos_token_id"),
                   unk_token_id=token_id("tokenizer.ggml.unknown_token_id"),
                   pad_token_id=token_id("tokenizer.ggml.padding_token_id"), extra_end_token_ids=extra_ends,
                   add_bos_token=bool(field("tokenizer.ggml.add_bos_token", add_bos_default)),
                   chat_template=field("tokenizer.chat_template"),
                   chat_template_source=f"{where} 'tokenizer.chat_template'",
                   gguf_pre=None if spm is not None else pre.name, spm=spm, source=where)

    @staticmethod
    def _bpe_backend(field, tokens: list[str], token_types: list[int], where: str):
        """The byte-level BPE of a ``gpt2`` GGUF vocabulary and its llama.cpp pre-tokenizer."""
        merges = field("tokenizer.ggml.merges", required=True)
        pre_name = str(field("tokenizer.ggml.pre", "default"))
        pre = _PRE_BY_NAME.get(pre_name)
        if pre is None:
            raise TokenizerError(f"pre-tokenizer '{pre_name}' is not supported "
                                 f"(supported: {', '.join(supported_pre_tokenizers())})",
                                 where=f"{where} 'tokenizer.ggml.pre'",
                                 fix="load the model from its Hugging Face folder (tokenizer.json) instead")
        try:
            pairs = [tuple(str(merge).split(" ", 1)) for merge in merges]
            bpe = models.BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=pairs,
                             ignore_merges=pre.ignore_merges, fuse_unk=False, byte_fallback=False)
        except Exception as error:
            raise TokenizerError(f"vocabulary and merges do not form a BPE model: {error}",
                                 where=f"{where} 'tokenizer.ggml.merges'", fix="re-convert the model") from None
        backend = tokenizers.Tokenizer(bpe)
        backend.pre_tokenizer = _pre_tokenizer_for(pre)
        backend.decoder = decoders.ByteLevel()
        backend.add_tokens([
            AddedToken(tokens[index], special=token_type != TOKEN_USER_DEFINED, normalized=False)
            for index, token_type in enumerate(token_types)
            if token_type in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN)
        ])
        return backend, pre

    def to_gguf_metadata(self) -> dict[str, Any]:
        """GGUF ``tokenizer.*`` metadata (plain Python values) from which llama.cpp and
        ``from_gguf_metadata`` rebuild this tokenizer. Ids are uint32, token types int32 in the file."""
        state = json.loads(self.backend.to_str())
        model = state.get("model") or {}
        if self.spm is not None or is_spm_backend(state):
            return self._spm_gguf_metadata(state)
        if model.get("type") != "BPE" or state.get("decoder", {}).get("type") != "ByteLevel":
            raise TokenizerError(f"only byte-level BPE tokenizers can be written to GGUF, this one is "
                                 f"{model.get('type')}", where=self.source,
                                 fix="export the merged Hugging Face folder instead and convert it with llama.cpp")
        pre_name = self.gguf_pre or self._detect_pre(state.get("pre_tokenizer"))
        vocab = self.backend.get_vocab(with_added_tokens=True)
        size = max(vocab.values()) + 1
        tokens: list[str | None] = [None] * size
        for token, index in vocab.items():
            tokens[index] = token
        added = {token.content: token for token in self.backend.get_added_tokens_decoder().values()}
        token_types = []
        for index, token in enumerate(tokens):
            if token is None:  # holes in the id space become unused placeholders, as llama.cpp's converter does
                tokens[index], kind = f"[PAD{index}]", TOKEN_UNUSED
            elif token in added:
                kind = TOKEN_CONTROL if added[token].special else TOKEN_USER_DEFINED
            else:
                kind = TOKEN_NORMAL
            token_types.append(kind)
        merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in model.get("merges", [])]
        metadata = {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre_name,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": token_types,
            "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.eos_token_id": self.eos_token_id,
            "tokenizer.ggml.padding_token_id": self.pad_token_id,
            "tokenizer.ggml.add_bos_token": self.add_bos_token,
        }
        optional = {
            "tokenizer.ggml.bos_token_id": self.bos_token_id,
            "tokenizer.ggml.unknown_token_id": self.unk_token_id,
            "tokenizer.ggml.eot_token_id": self._eot_token_id(),
            "tokenizer.chat_template": self.chat_template,
        }
        metadata.update({key: value for key, value in optional.items() if value is not None})
        return metadata

    def _spm_gguf_metadata(self, state: dict) -> dict[str, Any]:
        """``tokenizer.ggml.model = "llama"`` metadata: the GGUF's own pieces, or those of a SentencePiece-style
        tokenizer.json (scores from the folder's tokenizer.model when present)."""
        spm = self.spm
        if spm is None:
            added = {token.content: token.special for token in self.backend.get_added_tokens_decoder().values()}
            folder = Path(self.source) if Path(self.source).is_dir() else None
            spm = vocab_from_hf(state, added, folder)
        metadata = {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": list(spm.tokens),
            "tokenizer.ggml.scores": list(spm.scores),
            "tokenizer.ggml.token_type": list(spm.token_types),
            "tokenizer.ggml.add_space_prefix": spm.add_space_prefix,
            "tokenizer.ggml.eos_token_id": self.eos_token_id,
            "tokenizer.ggml.padding_token_id": self.pad_token_id,
            "tokenizer.ggml.add_bos_token": self.add_bos_token,
        }
        optional = {
            "tokenizer.ggml.bos_token_id": self.bos_token_id,
            "tokenizer.ggml.unknown_token_id": self.unk_token_id,
            "tokenizer.ggml.eot_token_id": self._eot_token_id(),
            "tokenizer.chat_template": self.chat_template,
        }
        metadata.update({key: value for key, value in optional.items() if value is not None})
        return metadata

    # Encoding -------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in it become single tokens. With
        ``add_special_tokens`` BOS is prepended when the model asks for it (``add_bos_token``)."""
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token:
            ids.insert(0, self.bos_token_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, index: int) -> str | None:
        return self.backend.id_to_token(index)

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str:
        return self.id_to_token(self.eos_token_id)

    # Chat -----------------------------------------------------------------------------------------------

    def render_chat(self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = False,
                    tools: Sequence[Mapping[str, Any]] | None = None,
                    documents: Sequence[Mapping[str, Any]] | None = None, **extra: Any) -> str:
        """The model's own chat template applied to ``messages`` (sandboxed, HF-compatible variables)."""
        template, source = self.chat_template, self.chat_template_source
        if tools is not None and "tool_use" in self.named_chat_templates:
            template, source = self.named_chat_templates["tool_use"], f"{source} 'tool_use'"
        if template is None:
            raise TemplateError("the model has no chat template", where=self.source,
                                fix="use an instruct/chat model, or give the tokenizer a chat template")
        variables = {"eos_token": self.eos_token, **({"bos_token": self.bos_token} if self.bos_token else {}), **extra}
        return render_template(template, messages=list(messages), add_generation_prompt=add_generation_prompt,
                               tools=list(tools) if tools is not None else None,
                               documents=list(documents) if documents is not None else None,
                               source=source, **variables)

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = False,
                    **render_kwargs: Any) -> list[int]:
        """Render and encode; BOS is added only if the model wants one and the template did not write it."""
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, **render_kwargs)
        template_wrote_bos = self.bos_token is not None and text.startswith(self.bos_token)
        return self.encode(text, add_special_tokens=not template_wrote_bos)

    # Helpers --------------------------------------------------------------------------------------------

    def _special_ids(self) -> dict[str, int]:
        return {token.content: index for index, token in self.backend.get_added_tokens_decoder().items()
                if token.special}

    def _end_token_ids(self, extra: Sequence[int]) -> set[int]:
        special = self._special_ids()
        return {self.eos_token_id, *extra, *(special[name] for name in END_TOKEN_NAMES if name in special)}

    def _eot_token_id(self) -> int | None:
        """The end-of-turn token llama.cpp should stop on when it differs from EOS (e.g. <|eot_id|>)."""
        special = self._special_ids()
        for name in ("<|eot_id|>", "<|im_end|>", "<end_of_turn>", "<|end|>"):
            if name in special and special[name] != self.eos_token_id:
                return special[name]
        return None

    def _choose_pad(self, configured: int | None) -> int:
        """A pad token distinct from EOS, so that padding never hides the EOS the model must learn.

        Order: the configured pad (if not EOS); a dedicated pad token of the vocabulary; a reserved special
        token; unk (if not EOS); and only when none exists, EOS itself (padding is masked out of attention
        and loss anyway; the cost is that code comparing ids to pad_token_id cannot tell them apart).
        """
        if configured is not None and configured != self.eos_token_id:
            return configured
        special = self._special_ids()
        for name in PAD_TOKEN_NAMES:
            if name in special and special[name] != self.eos_token_id:
                return special[name]
        reserved = sorted(index for name, index in special.items() if _RESERVED_TOKEN.fullmatch(name))
        if reserved:
            return reserved[0]
        if self.unk_token_id is not None and self.unk_token_id != self.eos_token_id:
            return self.unk_token_id
        return self.eos_token_id

    def _detect_pre(self, config: Mapping[str, Any] | None) -> str:
        regexes = _split_regexes(config)
        for pre in PRE_TOKENIZERS:
            if regexes == pre.regexes:
                return pre.name
        raise TokenizerError("this tokenizer's pre-tokenizer has no llama.cpp name "
                             f"(known: {', '.join(p.name for p in PRE_TOKENIZERS)})", where=self.source,
                             fix="export the merged Hugging Face folder and convert it with llama.cpp's "
                                 "convert_hf_to_gguf.py, which knows more tokenizers")

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"add_bos_token={self.add_bos_token}, chat_template={'yes' if self.chat_template else 'no'})")


# --- HF folder helpers ------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerError(f"unreadable JSON: {error}", where=str(path),
                             fix="re-download the file or fix its JSON") from None
    if not isinstance(data, dict):
        raise TokenizerError("expected a JSON object", where=str(path), fix="re-download the file")
    return data


def _token_content(value: Any) -> str | None:
    """Special tokens appear as plain strings or as serialised AddedToken dicts ({"content": ...})."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _post_processor_prepends(config: Mapping[str, Any] | None, bos: int | None) -> bool:
    """Whether a tokenizer.json post-processor puts BOS in front of a single sequence."""
    if not config or bos is None:
        return False
    if config.get("type") == "Sequence":
        return any(_post_processor_prepends(part, bos) for part in config.get("processors", []))
    if config.get("type") != "TemplateProcessing" or not config.get("single"):
        return False
    first = config["single"][0].get("SpecialToken")
    if not first:
        return False
    ids = (config.get("special_tokens", {}).get(first["id"]) or {}).get("ids", [])
    return ids[:1] == [bos]


def _hf_chat_templates(folder: Path, config: Mapping[str, Any]) -> tuple[dict[str, str], str]:
    """Named chat templates ("default" is the one used) and where they come from.

    chat_template.jinja wins over tokenizer_config.json's chat_template, which is a string or a list of
    {"name", "template"} entries; a list without "default" uses its first entry by default.
    """
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return {"default": jinja_file.read_text(encoding="utf-8")}, str(jinja_file)
        except (OSError, UnicodeDecodeError) as error:
            raise TokenizerError(f"unreadable chat template ({error})", where=str(jinja_file),
                                 fix="save the template as UTF-8 text, or delete the file to use tokenizer_config.json's") from None
    where = f"{folder / 'tokenizer_config.json'} 'chat_template'"
    template = config.get("chat_template")
    if isinstance(template, str):
        return {"default": template}, where
    if isinstance(template, list):
        named = {entry["name"]: entry["template"] for entry in template
                 if isinstance(entry, Mapping) and isinstance(entry.get("template"), str)}
        if named and "default" not in named:
            named["default"] = next(iter(named.values()))
        return named, where
    return {}, where
