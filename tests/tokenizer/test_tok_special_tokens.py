"""Special tokens: end-of-turn ids, the pad choice, BOS handling, and how tokenizer_config.json spells them."""

from __future__ import annotations

import json
import shutil

import pytest
import tokenizers
from tok_fixtures import TEMPLATES

from homebake.tokenizer import Tokenizer

CHATML = (TEMPLATES / "smollm2-chatml.jinja").read_text(encoding="utf-8")
QWEN = (TEMPLATES / "qwen2.5-instruct.jinja").read_text(encoding="utf-8")
TALK = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


def ids_of(tokenizer: Tokenizer, *tokens: str) -> set[int]:
    return {tokenizer.token_to_id(token) for token in tokens}


@pytest.mark.parametrize("family, ends", [
    ("chatml", ("<|im_end|>", "<|endoftext|>")),
    ("llama3", ("<|eot_id|>", "<|end_of_text|>", "<|eom_id|>")),
    ("qwen2", ("<|im_end|>", "<|endoftext|>")),
    ("mistral", ("</s>",)),
])
def test_end_token_ids(family_dirs, family, ends):
    tokenizer = Tokenizer.from_hf_dir(family_dirs[family])
    assert tokenizer.end_token_ids == ids_of(tokenizer, *ends)
    assert tokenizer.eos_token_id in tokenizer.end_token_ids


@pytest.mark.parametrize("family, pad", [
    ("chatml", "<|endoftext|>"),  # configured pad is EOS -> unk
    ("llama3", "<|finetune_right_pad_id|>"),  # no pad configured -> the reserved padding token
    ("qwen2", "<|endoftext|>"),  # configured, distinct from EOS
    ("mistral", "<unk>"),  # no pad, no pad-like token -> unk
])
def test_pad_is_distinct_from_eos(family_dirs, family, pad):
    tokenizer = Tokenizer.from_hf_dir(family_dirs[family])
    assert tokenizer.pad_token_id == tokenizer.token_to_id(pad)
    assert tokenizer.pad_token_id != tokenizer.eos_token_id


def test_pad_falls_back_to_eos_only_when_nothing_else_exists():
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab={"a": 0, "</s>": 1}, merges=[]))
    backend.add_special_tokens(["</s>"])
    tokenizer = Tokenizer(backend, eos_token_id=1)
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 1
    backend.add_special_tokens(["<|reserved_special_token_3|>"])
    assert Tokenizer(backend, eos_token_id=1).pad_token_id == backend.token_to_id("<|reserved_special_token_3|>")


@pytest.mark.parametrize("family, add_bos", [("chatml", False), ("llama3", True), ("qwen2", False),
                                             ("mistral", True)])
def test_add_bos_from_config_or_post_processor(family_dirs, family, add_bos):
    tokenizer = Tokenizer.from_hf_dir(family_dirs[family])
    assert tokenizer.add_bos_token is add_bos
    ids = tokenizer.encode("hello", add_special_tokens=True)
    assert (ids[0] == tokenizer.bos_token_id) is add_bos
    assert ids[int(add_bos):] == tokenizer.encode("hello")


def test_encode_chat_never_doubles_bos(family_dirs):
    mistral = Tokenizer.from_hf_dir(family_dirs["mistral"])  # its template writes <s> itself
    ids = mistral.encode_chat(TALK)
    assert ids[0] == mistral.bos_token_id and ids.count(mistral.bos_token_id) == 1
    mistral.chat_template = CHATML  # a template that does not write BOS: the model's add_bos_token adds it once
    ids = mistral.encode_chat(TALK)
    assert ids[0] == mistral.bos_token_id and ids.count(mistral.bos_token_id) == 1
    assert ids[1:] == mistral.encode(mistral.render_chat(TALK))


def test_special_tokens_in_text_are_single_tokens(family_dirs):
    tokenizer = Tokenizer.from_hf_dir(family_dirs["qwen2"])
    ids = tokenizer.encode("a<|im_start|>b<tool_call>c")
    assert tokenizer.token_to_id("<|im_start|>") in ids and tokenizer.token_to_id("<tool_call>") in ids
    # <tool_call> is an added but not special token: decoding with skip_special_tokens keeps it
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab<tool_call>c"


def copy_folder(source, target, config_changes: dict, jinja: str | None = None):
    shutil.copytree(source, target)
    config = json.loads((target / "tokenizer_config.json").read_text(encoding="utf-8"))
    config.update(config_changes)
    (target / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    if jinja is not None:
        (target / "chat_template.jinja").write_text(jinja, encoding="utf-8")
    return target


def test_named_chat_templates_follow_transformers(family_dirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    named = [{"name": "default", "template": CHATML}, {"name": "tool_use", "template": QWEN}]
    folder = copy_folder(family_dirs["qwen2"], tmp_path / "named", {"chat_template": named})
    ours, reference = Tokenizer.from_hf_dir(folder), transformers.AutoTokenizer.from_pretrained(folder)
    tool = {"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}}
    for tools in (None, [tool]):
        assert ours.render_chat(TALK, tools=tools) == reference.apply_chat_template(TALK, tools=tools,
                                                                                    tokenize=False)
    assert ours.render_chat(TALK) == Tokenizer.from_hf_dir(family_dirs["chatml"]).render_chat(TALK)


def test_chat_template_jinja_file_wins_like_transformers(family_dirs, tmp_path):
    transformers = pytest.importorskip("transformers")
    folder = copy_folder(family_dirs["qwen2"], tmp_path / "jinja", {}, jinja=CHATML)
    ours, reference = Tokenizer.from_hf_dir(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert ours.chat_template == CHATML
    assert ours.render_chat(TALK) == reference.apply_chat_template(TALK, tokenize=False)


def test_special_tokens_map_and_generation_config_are_read(family_dirs, tmp_path):
    folder = copy_folder(family_dirs["chatml"], tmp_path / "legacy", {})
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    for field in ("bos_token", "eos_token", "pad_token", "unk_token"):
        config.pop(field)
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))  # <|endoftext|>
    tokenizer = Tokenizer.from_hf_dir(folder)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.bos_token_id is None
    assert 0 in tokenizer.end_token_ids
