"""Builders for tokenizer tests: tiny trained vocabularies written as HF folders, reference
pre-tokenizer configs as the models ship them, GGUF metadata read from files, and test strings."""

from __future__ import annotations

import json
from pathlib import Path

import tokenizers
from tokenizers import models, pre_tokenizers, trainers

TEMPLATES = Path(__file__).resolve().parent.parent / "fixtures" / "templates"

STRINGS = [
    "Hello, world! How's it going? I'm fine; we'll see, they've gone.",
    "I'M SHOUTING: IT'S, WE'LL, THEY'RE, YOU'VE, I'D, she'S",
    "The year 2024 had 366 days; pi = 3.14159, 1,000,000 and 12345678901.",
    "numbers: 0 00 007 1.5e-10 -42 ½ ² ① Ⅻ ١٢٣ ４２",
    "日本語のテキストと中文文本，还有한국어 텍스트.",
    "مرحبا بالعالم، كيف حالك؟",
    "Привет, мир! Ёжик в тумане.",
    "Café déjà vu, naïve façade, Ångström, São Paulo, Zürich, Øresund.",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧‍👦 flag 🇫🇷 heart ❤️ done",
    "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))\n",
    "if (x >= 10 && y != 0) { z = x / y; } else { z = -1; } // C-ish $var ^~|<=>",
    "spaces:   three   and\ttabs\t\tand\nnewlines\n\n\nend   ",
    "   leading spaces and trailing spaces   ",
    "\t\n \r\n mixed whitespace \u00a0 nbsp and\u3000ideographic space\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
    "Text with special<|im_end|>inside and <|endoftext|> too",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
    "<s>[INST] question [/INST] answer</s>",
    "",
]

_CORPUS_EXTRA = [
    "the quick brown fox jumps over the lazy dog. The Quick Brown Fox!",
    "You are a helpful assistant. What is the weather in Paris today?",
    "system user assistant tool function arguments name content role",
    "import json\nfor i in range(10):\n    print(i, json.dumps({'a': i}))\n",
    "Привет мир привет Москва", "中文 文本 日本 東京", "مرحبا عالم",
]

# Special tokens of each template family: (content, special). Qwen's <tool_call> is a non-special added token.
FAMILY_TOKENS = {
    "chatml": [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True)],
    "llama3": [("<|begin_of_text|>", True), ("<|end_of_text|>", True), ("<|reserved_special_token_0|>", True),
               ("<|finetune_right_pad_id|>", True), ("<|start_header_id|>", True), ("<|end_header_id|>", True),
               ("<|eom_id|>", True), ("<|eot_id|>", True), ("<|python_tag|>", True)],
    "qwen2": [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<tool_call>", False),
              ("</tool_call>", False)],
    "mistral": [("<unk>", True), ("<s>", True), ("</s>", True), ("[INST]", True), ("[/INST]", True),
                ("[TOOL_CALLS]", True), ("[AVAILABLE_TOOLS]", True), ("[/AVAILABLE_TOOLS]", True),
                ("[TOOL_RESULTS]", True), ("[/TOOL_RESULTS]", True)],
}

# Pre-tokenizers as the models' own tokenizer.json files ship them (SmolLM2, Llama 3.x, Qwen2.5, GPT-2).
_HF_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_HF_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
             r"|\s*[\r\n]+|\s+(?!\S)|\s+")
REFERENCE_PRE_TOKENIZERS = {
    "smollm": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
    "llama-bpe": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _HF_LLAMA3}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    "qwen2": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": _HF_QWEN2}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]},
    "gpt-2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
}
FAMILY_PRE = {"chatml": "smollm", "llama3": "llama-bpe", "qwen2": "qwen2", "mistral": "gpt-2"}


def train_tiny_bpe(vocab_size: int = 700) -> dict:
    """A small byte-level BPE (tokenizer.json state) trained on the test strings, all family tokens first."""
    specials = list(dict.fromkeys(content for tokens in FAMILY_TOKENS.values() for content, _ in tokens))
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(STRINGS * 3 + _CORPUS_EXTRA * 5, trainer=trainer)
    state = json.loads(backend.to_str())
    state["added_tokens"] = []
    return state


def tokenizer_json(state: dict, pre_name: str, added: list[tuple[str, bool]], *, post_bos: str | None = None,
                   normalizer: dict | None = None) -> dict:
    """A tokenizer.json state with the reference pre-tokenizer for ``pre_name`` and the given added tokens."""
    state = json.loads(json.dumps(state))
    vocab = state["model"]["vocab"]
    state["model"]["ignore_merges"] = pre_name == "llama-bpe"  # as Llama 3's tokenizer.json
    state["normalizer"] = normalizer
    state["pre_tokenizer"] = REFERENCE_PRE_TOKENIZERS[pre_name]
    state["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}
    state["added_tokens"] = [
        {"id": vocab[content], "content": content, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": special} for content, special in added]
    state["post_processor"] = None
    if post_bos is not None:  # Llama 3 style: the post-processor prepends BOS
        state["post_processor"] = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": post_bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": post_bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": post_bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {post_bos: {"id": post_bos, "ids": [vocab[post_bos]], "tokens": [post_bos]}},
        }
    return state


def added_token_dict(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False, "special": True}


def write_family_folder(folder: Path, state: dict, family: str) -> Path:
    """An HF tokenizer folder of one template family with its real chat template, over the tiny vocabulary."""
    folder.mkdir(parents=True, exist_ok=True)
    added = FAMILY_TOKENS[family]
    template = {"chatml": "smollm2-chatml.jinja", "llama3": "llama3.1-instruct.jinja",
                "qwen2": "qwen2.5-instruct.jinja", "mistral": "mistral-7b-instruct-v0.3.jinja"}[family]
    config = {"chat_template": (TEMPLATES / template).read_text(encoding="utf-8"),
              "clean_up_tokenization_spaces": False, "model_max_length": 4096,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    post_bos, normalizer = None, None
    if family == "chatml":  # SmolLM2-Instruct's config
        config.update(bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>",
                      unk_token="<|endoftext|>")
    elif family == "llama3":  # Llama 3.1 Instruct: BOS comes from the post-processor, eos list in generation_config
        config.update(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
        post_bos = "<|begin_of_text|>"
        vocab = state["model"]["vocab"]
        generation = {"eos_token_id": [vocab["<|end_of_text|>"], vocab["<|eom_id|>"], vocab["<|eot_id|>"]]}
        (folder / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    elif family == "qwen2":  # Qwen2.5 Instruct: no BOS, NFC normaliser
        config.update(bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>", unk_token=None)
        normalizer = {"type": "NFC"}
    elif family == "mistral":  # Mistral v0.3 writes its tokens as AddedToken dicts and asks for BOS
        post_bos = "<s>"
        config.update(bos_token=added_token_dict("<s>"), eos_token=added_token_dict("</s>"),
                      unk_token=added_token_dict("<unk>"), add_bos_token=True, add_eos_token=False)
    state = tokenizer_json(state, FAMILY_PRE[family], added, post_bos=post_bos, normalizer=normalizer)
    (folder / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder


def gguf_metadata_from_state(state: dict, pre_name: str, added: list[tuple[str, bool]], *, bos: str | None,
                             eos: str, chat_template: str | None = None) -> dict:
    """GGUF tokenizer metadata written the way llama.cpp's converter does, from a tokenizer.json state."""
    vocab = state["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    kinds = {content: (3 if special else 4) for content, special in added}
    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre_name,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [kinds.get(token, 1) for token in tokens],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]],
        "tokenizer.ggml.eos_token_id": vocab[eos],
        "tokenizer.ggml.add_bos_token": False,
    }
    if bos is not None:
        metadata["tokenizer.ggml.bos_token_id"] = vocab[bos]
    if chat_template is not None:
        metadata["tokenizer.chat_template"] = chat_template
    return metadata


def read_gguf_tokenizer_metadata(path: Path) -> dict:
    """The tokenizer.* metadata of a GGUF file as plain Python values, read with gguf's own reader."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
