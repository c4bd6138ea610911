"""Tokenizers of the four template families for data tests: a tiny byte-level BPE trained on the fly with
the family's special tokens, and the family's real chat template from tests/fixtures/templates."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from homebake.tokenizer import Tokenizer

TEMPLATES = Path(__file__).resolve().parent.parent / "fixtures" / "templates"
MARKED_TEMPLATES = Path(__file__).resolve().parent / "fixtures"

CORPUS = [
    "You are a helpful assistant. Be brief. Hello there! How are you today?",
    "What is the capital of France? Paris is the capital of France.",
    "Goodbye, and thanks for all the fish. See you soon.",
    "The quick brown fox jumps over the lazy dog 0123456789.",
    "system user assistant tool function arguments name content role",
]


@dataclass(frozen=True)
class Family:
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    add_bos: bool
    extra_ends: tuple[str, ...] = ()
    unk: str | None = None
    pad: str | None = None


FAMILIES = {
    "smollm2": Family("smollm2-chatml.jinja", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                      bos="<|im_start|>", eos="<|im_end|>", add_bos=False, unk="<|endoftext|>", pad="<|im_end|>"),
    "llama3": Family("llama3.1-instruct.jinja",
                     ("<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
                      "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"),
                     bos="<|begin_of_text|>", eos="<|eot_id|>", add_bos=True, extra_ends=("<|end_of_text|>",)),
    "qwen2.5": Family("qwen2.5-instruct.jinja", ("<|endoftext|>", "<|im_start|>", "<|im_end|>"),
                      bos=None, eos="<|im_end|>", add_bos=False, pad="<|endoftext|>"),
    "mistral": Family("mistral-7b-instruct-v0.3.jinja",
                      ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                       "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"),
                      bos="<s>", eos="</s>", add_bos=True, unk="<unk>"),
}


@functools.lru_cache(maxsize=None)
def backend_state(specials: tuple[str, ...]) -> str:
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(CORPUS * 4, trainer=trainer)
    return backend.to_str()


def template_text(name: str) -> str:
    return (TEMPLATES / FAMILIES[name].template).read_text(encoding="utf-8")


def family_tokenizer(name: str, *, template: str | None = None) -> Tokenizer:
    family = FAMILIES[name]
    backend = tokenizers.Tokenizer.from_str(backend_state(family.specials))
    ids = {token: backend.token_to_id(token) for token in family.specials}
    return Tokenizer(backend, eos_token_id=ids[family.eos], bos_token_id=ids.get(family.bos),
                     extra_end_token_ids=[ids[t] for t in family.extra_ends], add_bos_token=family.add_bos,
                     unk_token_id=ids.get(family.unk), pad_token_id=ids.get(family.pad),
                     chat_template=template if template is not None else template_text(name),
                     source=f"{name} test tokenizer")


def hf_tokenizer(name: str, template: str):
    """The same vocabulary as a transformers tokenizer, for reference masks."""
    from transformers import PreTrainedTokenizerFast

    family = FAMILIES[name]
    backend = tokenizers.Tokenizer.from_str(backend_state(family.specials))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=family.bos, eos_token=family.eos,
                                   chat_template=template)


def write_tokenizer_folder(folder: Path, name: str) -> Path:
    """An HF tokenizer folder (tokenizer.json + tokenizer_config.json with the chat template), usable as
    `--model` for commands that only need the tokenizer."""
    import json

    family = FAMILIES[name]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.json").write_text(backend_state(family.specials), encoding="utf-8")
    config = {"bos_token": family.bos, "eos_token": family.eos, "unk_token": family.unk, "pad_token": family.pad,
              "add_bos_token": family.add_bos, "chat_template": template_text(name)}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
