"""Ollama Modelfile: the Go TEMPLATE renders every conversation exactly as the model's own template.

The comparison runs Go's text/template (what Ollama uses) on Ollama's message collation; it is
skipped where no Go toolchain is installed. The Modelfile structure is checked everywhere.
"""

import json
import shutil
import subprocess

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from homebake.errors import ExportError, TemplateError
from homebake.export import ollama

from .chat_templates import TEMPLATES

CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"},
     {"role": "user", "content": "Another one\nplease"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Hello"},
     {"role": "assistant", "content": "Bonjour"}, {"role": "user", "content": "Thanks"}],
]


def jinja_renderer(template, bos, eos):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message):
        raise TemplateError(message)

    compiled = env.from_string(template)

    def render(messages, add_generation_prompt):
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos,
                               eos_token=eos, raise_exception=raise_exception)

    return render


def strip_bos(text, template, bos):
    """Drop the BOS text a template emits itself: Ollama/llama.cpp add it as a token instead."""
    return text[len(bos):] if "bos_token" in template and text.startswith(bos) else text


@pytest.fixture(scope="module")
def go_render(tmp_path_factory):
    if shutil.which("go") is None:
        pytest.skip("no Go toolchain to run text/template")
    from pathlib import Path

    workdir = tmp_path_factory.mktemp("gotmpl")
    shutil.copy(Path(__file__).parent / "go_template" / "main.go", workdir / "main.go")
    (workdir / "go.mod").write_text("module gotmpl\n\ngo 1.18\n")
    subprocess.run(["go", "build", "-o", "render", "."], cwd=workdir, check=True, capture_output=True, timeout=300)

    def render(template, system, messages):
        payload = json.dumps({"template": template, "system": system or "", "messages": messages})
        proc = subprocess.run([str(workdir / "render")], input=payload, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    return render


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_go_template_matches_model_template(name, go_render):
    template, bos, eos, ends = TEMPLATES[name]
    render = jinja_renderer(template, bos, eos)
    result = ollama.ollama_template(template, render, ends)
    for messages in CONVERSATIONS:
        try:
            expected = render(messages, True)
        except TemplateError:
            continue  # the model itself refuses this conversation (e.g. a system role)
        expected = strip_bos(expected, template, bos)
        assert go_render(result.template, result.system, messages) == expected, messages


@pytest.mark.parametrize("name", ["smollm2", "llama3.1", "mistral-v0.3", "gemma-2", "gemma-3", "phi-3",
                                  "phi-4-mini"])
def test_conversation_ending_with_assistant_is_left_open(name, go_render):
    template, bos, eos, ends = TEMPLATES[name]
    render = jinja_renderer(template, bos, eos)
    result = ollama.ollama_template(template, render, ends)
    messages = [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi"}]
    closed = render(messages, False)
    closed = strip_bos(closed, template, bos)
    rendered = go_render(result.template, result.system, messages)
    assert rendered.endswith("Hi") and closed.startswith(rendered)


def test_family_detection_and_defaults():
    expectations = {
        "smollm2": ("chatml", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
        "qwen2.5": ("chatml", "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
        "chatml": ("chatml", None),
        "llama3": ("llama3", None),
        "llama3.1": ("llama3", None),  # its preamble lives in the TEMPLATE, not in SYSTEM
        "mistral-v0.3": ("mistral", None),
        "mistral-v0.1": ("mistral", None),
        "gemma-2": ("gemma", None),
        "gemma-3": ("gemma", None),
        "phi-3": ("phi3", None),
        "phi-4-mini": ("phi3", None),
    }
    for name, (family, system) in expectations.items():
        template, bos, eos, ends = TEMPLATES[name]
        result = ollama.ollama_template(template, jinja_renderer(template, bos, eos), ends)
        assert (result.family, result.system) == (family, system), name
    llama31 = ollama.ollama_template(TEMPLATES["llama3.1"][0], jinja_renderer(*TEMPLATES["llama3.1"][:3]), [])
    assert "Cutting Knowledge Date: December 2023" in llama31.template


def test_unknown_or_missing_template_is_refused():
    with pytest.raises(ExportError, match="ChatML"):
        ollama.detect_family("{% for m in messages %}### {{ m.role }}: {{ m.content }}{% endfor %}")
    with pytest.raises(ExportError, match="no chat template"):
        ollama.detect_family(None)


def test_modelfile_has_from_template_system_and_every_stop():
    template, bos, eos, ends = TEMPLATES["llama3.1"]
    result = ollama.ollama_template(template, jinja_renderer(template, bos, eos), ends)
    text = ollama.modelfile_text("model-Q4_K_M.gguf", result)
    lines = text.splitlines()
    assert lines[0] == "FROM ./model-Q4_K_M.gguf"
    assert text.count('TEMPLATE """') == 1
    stops = [line.split(" ", 2)[2] for line in lines if line.startswith("PARAMETER stop")]
    for token in ends + ["<|start_header_id|>"]:
        assert f'"{token}"' in stops
    assert len(stops) == len(set(stops))
    smol = ollama.ollama_template(TEMPLATES["smollm2"][0], jinja_renderer(*TEMPLATES["smollm2"][:3]), ["<|im_end|>"])
    smol_text = ollama.modelfile_text("m.gguf", smol, adapter_name="lora.gguf")
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in smol_text
    assert "ADAPTER ./lora.gguf" in smol_text


def test_create_command_and_name():
    assert ollama.ollama_model_name("My Fine_Tune v2!") == "my-fine_tune-v2"
    assert ollama.create_command("m", "out/Modelfile") == "ollama create m -f out/Modelfile"
