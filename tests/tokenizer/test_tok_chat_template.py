"""Chat templates: rendering parity with transformers' apply_chat_template for real templates
(SmolLM2/ChatML, Llama 3.1, Qwen2.5, Mistral v0.3; with tools), HF helpers, errors and the sandbox."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from tok_fixtures import TEMPLATES

from homebake.chat_template import compile_template, render_template
from homebake.errors import TemplateError
from homebake.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

FAMILIES = ["chatml", "llama3", "qwen2", "mistral"]

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant. Answer in one line."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? Écris «東京» too 😀"},
    {"role": "assistant", "content": "  Tokyo (東京).  "},
]

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object",
                   "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"},
                                  "unit": {"type": "string", "enum": ["C", "F"]}},
                   "required": ["city"]}}}

TOOL_CONVERSATION = [
    {"role": "system", "content": "You can check the weather."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call12345", "type": "function", "function": {"name": "get_weather",
                                                            "arguments": {"city": "Paris", "unit": "C"}}}]},
    {"role": "tool", "tool_call_id": "call12345", "name": "get_weather", "content": "22 degrees, sunny"},
    {"role": "assistant", "content": "It is 22 °C and sunny in Paris."},
]


@pytest.fixture(scope="module")
def pairs(family_dirs):
    """(ours, transformers') tokenizer per family."""
    return {family: (Tokenizer.from_hf_dir(folder), transformers.AutoTokenizer.from_pretrained(folder))
            for family, folder in family_dirs.items()}


def reference_ids(reference, messages, **kwargs) -> list[int]:
    return reference.apply_chat_template(messages, tokenize=True, return_dict=False, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_matches_transformers(pairs, family, add_generation_prompt):
    ours, reference = pairs[family]
    messages = CONVERSATION[:-1] if add_generation_prompt else CONVERSATION
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.render_chat(messages, add_generation_prompt=add_generation_prompt) == expected
    assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == reference_ids(
        reference, messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("family", FAMILIES)  # chatml ignores tools; the others render them
def test_render_with_tools_matches_transformers(pairs, family):
    ours, reference = pairs[family]
    conversations = [TOOL_CONVERSATION[:2]]
    if family == "chatml":  # its template reads every message's content, so a tool-call turn breaks both
        with pytest.raises(Exception):
            reference.apply_chat_template(TOOL_CONVERSATION, tools=[WEATHER_TOOL], tokenize=False)
        with pytest.raises(TemplateError, match="UndefinedError"):
            ours.render_chat(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    else:
        conversations.append(TOOL_CONVERSATION)
    for messages in conversations:
        expected = reference.apply_chat_template(messages, tools=[WEATHER_TOOL], tokenize=False)
        rendered = ours.render_chat(messages, tools=[WEATHER_TOOL])
        assert rendered == expected
        if family != "chatml":
            assert "get_weather" in rendered
        assert ours.encode_chat(messages, tools=[WEATHER_TOOL]) == reference_ids(reference, messages,
                                                                                  tools=[WEATHER_TOOL])


def test_extra_variables_reach_the_template(pairs):
    """Llama 3.1's builtin_tools and date_string arrive as extra keyword arguments, as in transformers."""
    ours, reference = pairs["llama3"]
    extra = {"builtin_tools": ["brave_search", "wolfram_alpha"], "date_string": "01 Jan 2026"}
    expected = reference.apply_chat_template(CONVERSATION[:2], tokenize=False, add_generation_prompt=True, **extra)
    rendered = ours.render_chat(CONVERSATION[:2], add_generation_prompt=True, **extra)
    assert rendered == expected
    assert "Tools: brave_search, wolfram_alpha" in rendered and "01 Jan 2026" in rendered


HELPER_TEMPLATES = [
    "{{ messages | tojson }}",
    "{{ messages[0] | tojson(indent=2) }}|{{ tools | tojson(separators=(',', ':'), sort_keys=true) }}",
    "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}{{ m.role }};"
    "{% if loop.index >= 3 %}{% break %}{% endif %}{% endfor %}",
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + m.content|length %}{% endfor %}"
    "{{ ns.n }}",
    "{% for m in messages %}{% generation %}<{{ m.role }}>{% endgeneration %}{% endfor %}",
    "{{ dict(a=1, b='x') | tojson }}{{ documents | map(attribute='title') | join(',') }}",
    "  {% if add_generation_prompt %}\n  yes\n  {% endif %}\n{{ bos_token }}|{{ eos_token }}|{{ custom }}",
]


@pytest.mark.parametrize("template", HELPER_TEMPLATES)
def test_helpers_and_whitespace_match_transformers(pairs, template):
    ours, reference = pairs["chatml"]
    documents = [{"title": "Doc A", "text": "alpha"}, {"title": "Dök B", "text": "beta"}]
    kwargs = dict(tools=[WEATHER_TOOL], documents=documents, add_generation_prompt=True, custom="∑ extra")
    expected = reference.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False, **kwargs)
    ours.chat_template = template
    try:
        assert ours.render_chat(CONVERSATION, **kwargs) == expected
    finally:
        ours.chat_template = (TEMPLATES / "smollm2-chatml.jinja").read_text(encoding="utf-8")


def test_strftime_now_and_compile_cache():
    template = "{{ strftime_now('%Y-%m-%d') }}"
    before = datetime.now().strftime("%Y-%m-%d")
    rendered = render_template(template, messages=[])
    assert rendered in {before, datetime.now().strftime("%Y-%m-%d")}
    assert compile_template(template) is compile_template(template)


def test_tojson_keeps_unicode_and_html_characters():
    message = {"role": "user", "content": "<b>Zürich & 東京</b>"}
    rendered = render_template("{{ messages[0] | tojson }}", messages=[message])
    assert rendered == json.dumps(message, ensure_ascii=False)


def test_raise_exception_is_a_one_line_template_error_naming_the_source(pairs, family_dirs):
    ours, _ = pairs["mistral"]
    not_alternating = [{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]
    with pytest.raises(TemplateError) as caught:
        ours.render_chat(not_alternating)
    message = str(caught.value)
    assert "\n" not in message
    assert "conversation roles must alternate" in message
    assert str(family_dirs["mistral"] / "tokenizer_config.json") in message
    assert "line 18" in message  # the raise_exception line of the template


def test_syntax_error_names_source_and_line():
    with pytest.raises(TemplateError) as caught:
        render_template("line one\n{% if messages %}\n{% for %}", messages=[], source="model.gguf chat template")
    assert "model.gguf chat template line 3" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_missing_template_is_a_template_error(family_dirs):
    tokenizer = Tokenizer.from_hf_dir(family_dirs["chatml"])
    tokenizer.chat_template = None
    with pytest.raises(TemplateError, match="no chat template"):
        tokenizer.render_chat(CONVERSATION)


HOSTILE_TEMPLATES = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ lipsum.__globals__['os'].listdir('/') }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{{ self._TemplateReference__context }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os.system('id') }}",
    "{% extends '/etc/passwd' %}",
    "{% from 'subprocess' import run %}",
    "{{ '{0.__class__.__mro__}'.format(messages) }}",
    "{{ messages.append('x') }}{{ messages }}",
    "{{ messages[0].update({'role': 'root'}) }}",
    "{% set ns = namespace(__class__=1) %}",
    "{% set ns = namespace() %}{% set ns.__dict__ = 1 %}",
    "{{ dict.__class__ }}",
    "{{ range(10**9) | list | length }}",
    "{{ messages | attr('__class__') }}",
]


@pytest.mark.parametrize("template", HOSTILE_TEMPLATES)
def test_hostile_templates_cannot_escape_the_sandbox(template):
    with pytest.raises(TemplateError) as caught:
        render_template(template, messages=[{"role": "user", "content": "hi"}], source="evil.gguf chat template")
    message = str(caught.value)
    assert "\n" not in message and "evil.gguf chat template" in message
    assert "root:" not in message  # nothing of /etc/passwd leaked into the error


def test_sandbox_leaves_caller_data_untouched():
    messages = [{"role": "user", "content": "hi", "tool_calls": None}]
    assert render_template("{{ messages | tojson }}", messages=messages) == '[{"role": "user", "content": "hi"}]'
    assert messages == [{"role": "user", "content": "hi", "tool_calls": None}]
