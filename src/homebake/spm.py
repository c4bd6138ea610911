"""SentencePiece vocabularies (GGUF ``tokenizer.ggml.model = "llama"``: Llama 2, Mistral, Gemma, Phi-3).

A GGUF stores a SentencePiece BPE vocabulary as pieces (``▁`` for a space, ``<0xAB>`` byte pieces), one score
per piece and llama.cpp token types; it has no merges. llama.cpp encodes a text fragment by replacing spaces
with ``▁`` (prefixing one first when ``add_space_prefix`` and the fragment starts the text or follows a
special token), then repeatedly merging the adjacent pair whose concatenation is the best-scored piece;
characters no piece covers fall back to their UTF-8 byte pieces. The same encoding as a HF ``tokenizers``
BPE: merges are every split of every piece into two pieces, ordered best-scored result first (for Gemma by
position in the vocabulary: its scores do not follow its merge order, as transformers' GGUF loader notes),
``byte_fallback`` on, a ``Prepend("▁")`` + ``Replace(" ", "▁")`` normalizer applied to each fragment
between added tokens (so after special tokens too, as llama.cpp), and a decoder that undoes it.

Going the other way, ``vocab_from_hf`` turns a tokenizer.json of this shape (Gemma's, Phi-3's) into pieces,
scores and types: from the folder's ``tokenizer.model`` (SentencePiece's protobuf, read here without the
sentencepiece package) when there is one, otherwise with scores that rank pieces by the merge producing them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, normalizers

SPACE = "\u2581"
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


@dataclass
class SpmVocab:
    tokens: list[str]
    scores: list[float]
    token_types: list[int]
    add_space_prefix: bool = True
    merges_by_position: bool = False  # Gemma: merge order is the vocabulary order, not the scores

    def vocab_spelling(self) -> list[str]:
        """Pieces as the BPE model spells them: Gemma files store whitespace-only pieces with real spaces."""
        if not self.merges_by_position:
            return list(self.tokens)
        return [SPACE * len(t) if " " in t and not t.strip() else t for t in self.tokens]


def merges_from_vocab(vocab: dict[str, int], priority: dict[str, float]) -> list[tuple[str, str]]:
    """Every split of a piece into two pieces, best ``priority`` first; ties: longer left part, then longer
    right part, then vocabulary order (the order transformers' GGUF loader uses, so both encode alike)."""
    found: list[tuple[float, int, int, int, str, str]] = []
    for order, (piece, rank) in enumerate(priority.items()):
        pairs = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        pairs.sort(key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
        found.extend((rank, len(left), len(right), order, left, right) for left, right in pairs)
    # stable sort, descending on (priority, len left, len right): equal keys keep their insertion order
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)
    return [(left, right) for *_, left, right in found]


def spm_backend(spm: SpmVocab) -> tokenizers.Tokenizer:
    spelled = spm.vocab_spelling()
    vocab = {token: index for index, token in enumerate(spelled)}
    if spm.merges_by_position:
        priority = {token: -index for index, token in enumerate(spelled)}
    else:
        priority = dict(zip(spelled, spm.scores))
    unk = next((spelled[i] for i, kind in enumerate(spm.token_types) if kind == TOKEN_UNKNOWN), None)
    bpe = models.BPE(vocab=vocab, merges=merges_from_vocab(vocab, priority), byte_fallback=True, fuse_unk=True,
                     unk_token=unk)
    backend = tokenizers.Tokenizer(bpe)
    replace = normalizers.Replace(" ", SPACE)
    backend.normalizer = (normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if spm.add_space_prefix
                          else replace)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spm.add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    backend.decoder = decoders.Sequence(steps)
    vocab_set = set(vocab)
    backend.add_tokens([
        AddedToken(spm.tokens[index], special=kind != TOKEN_USER_DEFINED, normalized=False)
        for index, kind in enumerate(spm.token_types)
        if kind in (TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNKNOWN) and spm.tokens[index] in vocab_set
    ])
    return backend


def is_spm_backend(state: dict) -> bool:
    """Whether a tokenizer.json state is a SentencePiece-style BPE (byte fallback, ``▁`` for spaces)."""
    model = state.get("model") or {}
    decoder = state.get("decoder") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and SPACE in str(decoder) + str(
        state.get("normalizer")) + str(state.get("pre_tokenizer"))


def adds_space_prefix(state: dict) -> bool:
    """Whether a tokenizer.json prefixes text with ``▁`` (Prepend normalizer or Metaspace prepend)."""
    text = str(state.get("normalizer")) + str(state.get("pre_tokenizer"))
    if "Prepend" in text:
        return True
    pre = state.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if isinstance(pre, dict) else []
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
               and p.get("add_prefix_space", True) for p in parts if isinstance(p, dict))


def vocab_from_hf(state: dict, added: dict[str, bool], folder: Path | None) -> SpmVocab:
    """Pieces, scores and types of a SentencePiece-style tokenizer.json (``added``: content -> special)."""
    vocab: dict[str, int] = dict(state["model"]["vocab"])
    size = max([*vocab.values(), *(-1,)]) + 1
    tokens: list[str | None] = [None] * size
    for token, index in vocab.items():
        tokens[index] = token
    scores = [0.0] * size
    types = [TOKEN_NORMAL] * size
    proto = read_sentencepiece_model(folder / "tokenizer.model") if folder and (folder / "tokenizer.model").is_file() \
        else None
    if proto is not None:
        pieces = {piece: (score, kind) for piece, score, kind in proto[0]}
        for index, token in enumerate(tokens):
            if token in pieces:
                scores[index], types[index] = pieces[token][0], pieces[token][1]
    else:  # rank pieces by the merge that produces them (earlier merge = higher score), bytes as bytes
        merges = state["model"].get("merges") or []
        for rank, merge in enumerate(merges):
            left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
            index = vocab.get(left + right)
            if index is not None and scores[index] == 0.0:
                scores[index] = -float(rank + 1)
        for index, token in enumerate(tokens):
            if token and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                types[index] = TOKEN_BYTE
    unk = (state["model"].get("unk_token"))
    for index, token in enumerate(tokens):
        if token is None:
            tokens[index], types[index] = f"[PAD{index}]", TOKEN_UNUSED
        elif token in added:
            types[index] = TOKEN_CONTROL if added[token] else TOKEN_USER_DEFINED
        elif unk is not None and token == unk:
            types[index] = TOKEN_UNKNOWN
    add_prefix = proto[1] if proto is not None and proto[1] is not None else adds_space_prefix(state)
    return SpmVocab(tokens, scores, types, add_space_prefix=add_prefix)


# -- SentencePiece's ModelProto, just the fields a GGUF needs --------------------------------------------------

def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes):
    """(field number, wire type, value) of a protobuf message; value is bytes for length-delimited fields."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos:pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            value, pos = data[pos:pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def read_sentencepiece_model(path: Path) -> tuple[list[tuple[str, float, int]], bool | None] | None:
    """([(piece, score, type)], add_dummy_prefix) from a tokenizer.model, or None if it cannot be read.

    Piece types use SentencePiece's numbering, which is llama.cpp's (normal 1, unknown 2, control 3,
    user defined 4, unused 5, byte 6)."""
    try:
        data = Path(path).read_bytes()
        pieces: list[tuple[str, float, int]] = []
        add_prefix = None
        for number, wire, value in _fields(data):
            if number == 1 and wire == 2:  # repeated SentencePiece
                piece, score, kind = "", 0.0, TOKEN_NORMAL
                for sub, sub_wire, sub_value in _fields(value):
                    if sub == 1 and sub_wire == 2:
                        piece = sub_value.decode("utf-8")
                    elif sub == 2 and sub_wire == 5:
                        score = struct.unpack("<f", sub_value)[0]
                    elif sub == 3 and sub_wire == 0:
                        kind = sub_value
                pieces.append((piece, float(score), int(kind)))
            elif number == 3 and wire == 2:  # NormalizerSpec
                for sub, sub_wire, sub_value in _fields(value):
                    if sub == 3 and sub_wire == 0:
                        add_prefix = bool(sub_value)
        if add_prefix is None and pieces:
            add_prefix = True  # the protobuf default
        return (pieces, add_prefix) if pieces else None
    except (OSError, ValueError, IndexError, UnicodeDecodeError, struct.error):
        return None
