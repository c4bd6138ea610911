"""Ollama Modelfile: FROM the GGUF, a TEMPLATE in Ollama's Go-template syntax, stop parameters.

Ollama does not run the model's Jinja chat template; it needs its own Go template, and a lost or
wrong template is the classic cause of gibberish or endless output after a fine-tune. We support
the template families that cover the models homebake trains, detected from the template text:
ChatML (SmolLM2, Qwen2/2.5/3), Llama 3 (3.0-3.3), Mistral ([INST]), Gemma (<start_of_turn>; no system
role in Gemma 2, the system text prefixed to the first user turn in Gemma 3) and Phi-3 (<|user|> ...
<|end|>; Phi-3/3.5 with newlines, Phi-4-mini without). The family fixes the
structure; the details that vary between models (a default system prompt, Llama 3.1's
"Cutting Knowledge Date" preamble, Mistral's spacing and where the system prompt goes) are
measured by rendering probe conversations through the model's own template, so the Go template
reproduces what the model was trained on.

Ollama semantics we rely on: ``.Messages`` holds every message (system included, consecutive
same-role messages merged), ``.System`` is the system text, and a Modelfile ``SYSTEM`` is
inserted as the first message when a request has none. A conversation that ends with an
assistant message is left open, so Ollama continues it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ExportError, HomebakeError

# render(messages, add_generation_prompt) -> text, normally Tokenizer.render_chat
Render = Callable[[list, bool], str]

FAMILIES = ("chatml", "llama3", "mistral", "gemma", "phi3")
_MARKERS = {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>", "mistral": "[INST]",
            "gemma": "<start_of_turn>", "phi3": "<|assistant|>"}
# Role markers a model must never emit inside its own answer: stopping on them is a safety net
# for fine-tunes that learned the end token imperfectly.
_FAMILY_STOPS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": ["[INST]", "[/INST]"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
    "phi3": ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>"],
}
# Probe texts: unlikely to occur in any template, free of characters templates transform.
_SYS, _U1, _A1, _U2 = "SYSPROBE7f3a", "USERONEPROBE7f3a", "ASSISTANTPROBE7f3a", "USERTWOPROBE7f3a"
_LAST = "{{ $last := eq (len (slice $.Messages $i)) 1 }}"


@dataclass
class OllamaTemplate:
    family: str
    template: str  # Go template text for the Modelfile TEMPLATE
    system: str | None = None  # default system prompt the model's template injects (Modelfile SYSTEM)
    stops: list[str] = field(default_factory=list)


def detect_family(chat_template: str | None) -> str:
    """Which supported family a Jinja chat template belongs to (by its role markers)."""
    if chat_template:
        for family in FAMILIES:
            if _MARKERS[family] in chat_template:
                return family
    raise ExportError(
        "the model's chat template is not one Ollama export supports" if chat_template
        else "the model has no chat template, so Ollama would not know how to format a chat",
        where="tokenizer chat_template",
        fix="supported families: ChatML (<|im_start|>), Llama 3 (<|start_header_id|>), Mistral ([INST]), "
            "Gemma (<start_of_turn>), Phi-3 (<|user|>/<|assistant|>); "
            "export with --format gguf and write the Modelfile TEMPLATE by hand",
    )


def _probe(render: Render, messages: list, generation: bool) -> str | None:
    """Render probe messages; None when the template refuses them (e.g. no system role)."""
    try:
        return render(messages, generation)
    except HomebakeError:
        return None


def _block(text: str | None, start: str, end: str, before: str) -> str | None:
    """Content of the first ``start…end`` block that appears before ``before`` in ``text``."""
    if text is None:
        return None
    head = text.split(before, 1)[0]
    match = re.search(re.escape(start) + "(.*?)" + re.escape(end), head, re.S)
    return match.group(1) if match else None


def _header_template(render: Render, open_role: Callable[[str], str], close: str, family: str) -> OllamaTemplate:
    """ChatML and Llama 3: every turn is ``open(role) content close``; only the system turn varies."""
    sys_open = open_role("system")
    with_system = _block(_probe(render, [{"role": "system", "content": _SYS}, {"role": "user", "content": _U1}], False),
                         sys_open, close, _U1)
    without = _block(_probe(render, [{"role": "user", "content": _U1}], True), sys_open, close, _U1)
    preamble = with_system.split(_SYS, 1)[0] if with_system and _SYS in with_system else ""

    turn = open_role("{{ $m.Role }}") + "{{ $m.Content }}"
    gen = "{{ if and $last (ne $m.Role \"assistant\") }}" + close + open_role("assistant") + "{{ end }}"
    closing = "{{ if not $last }}" + close + "{{ end }}"
    if preamble:
        # Llama 3.1 style: one system turn always first, preamble + the system text.
        head = sys_open + preamble.replace("{{", "{{ \"{{\" }}") + "{{ .System }}" + close
        body = ("{{- range $i, $m := .Messages }}" + _LAST + "{{- if ne $m.Role \"system\" }}"
                + turn + closing + gen + "{{ end }}{{ end }}")
        return OllamaTemplate(family, head + body)
    body = "{{- range $i, $m := .Messages }}" + _LAST + turn + closing + gen + "{{ end }}"
    default_system = without if without is not None and _U1 not in without else None
    return OllamaTemplate(family, body, system=default_system or None)


def _chatml(render: Render) -> OllamaTemplate:
    return _header_template(render, lambda role: f"<|im_start|>{role}\n", "<|im_end|>\n", "chatml")


def _llama3(render: Render) -> OllamaTemplate:
    return _header_template(render, lambda role: f"<|start_header_id|>{role}<|end_header_id|>\n\n", "<|eot_id|>",
                            "llama3")


def _mistral(render: Render) -> OllamaTemplate:
    convo = [{"role": "user", "content": _U1}, {"role": "assistant", "content": _A1}, {"role": "user", "content": _U2}]
    text = _probe(render, convo, True)
    match = text and re.search(
        r"\[INST\](?P<u_open>\s*)" + _U1 + r"(?P<u_close>\s*)\[/INST\](?P<a_open>\s*)" + _A1 + r"(?P<a_close>.*?)\[INST\]",
        text, re.S)
    if not match:
        raise ExportError("could not read the Mistral chat format from the model's template",
                          where="tokenizer chat_template", fix="export with --format gguf and write the TEMPLATE by hand")
    u_open, u_close, a_open, a_close = match.group("u_open", "u_close", "a_open", "a_close")

    # Where does the system prompt go: first user turn (older templates) or last (v0.3)?
    sys_text = _probe(render, [{"role": "system", "content": _SYS}, *convo], True)
    system_part = ""
    if sys_text and _SYS in sys_text:
        after = sys_text.split(_SYS, 1)[1]
        target_last = after.find(_U2) != -1 and (after.find(_U1) == -1)
        sep = after.split(_U2 if target_last else _U1, 1)[0]
        condition = "$last" if target_last else "(not $sysDone)"
        system_part = ("{{ if and $.System " + condition + " }}{{ $.System }}" + sep
                       + "{{ $sysDone = true }}{{ end }}")
    template = (
        "{{- $sysDone := false }}{{- range $i, $m := .Messages }}" + _LAST
        + "{{- if eq $m.Role \"user\" }}[INST]" + u_open + system_part + "{{ $m.Content }}" + u_close + "[/INST]"
        + "{{- else if eq $m.Role \"assistant\" }}" + a_open + "{{ $m.Content }}{{ if not $last }}" + a_close
        + "{{ end }}{{ end }}{{ end }}"
    )
    return OllamaTemplate("mistral", template)


def _go_text(text: str) -> str:
    """Literal text inside a Go template (only "{{" needs escaping)."""
    return text.replace("{{", "{{ \"{{\" }}")


def _gemma(render: Render) -> OllamaTemplate:
    """<start_of_turn>user / model ... <end_of_turn>; a system message is either refused (Gemma 2) or
    written at the start of the first user turn (Gemma 3), followed by a measured separator."""
    def turn(role: str) -> str:
        return f"<start_of_turn>{role}\n"

    close = "<end_of_turn>\n"
    with_system = _probe(render, [{"role": "system", "content": _SYS}, {"role": "user", "content": _U1}], False)
    system_part = ""
    if with_system and _SYS in with_system:
        between = with_system.split(_SYS, 1)[1].split(_U1, 1)[0]
        system_part = "{{ if and $.System (not $sysDone) }}{{ $.System }}" + _go_text(between) + \
            "{{ end }}{{ $sysDone = true }}"
    template = (
        "{{- $sysDone := false }}{{- range $i, $m := .Messages }}" + _LAST
        + "{{- if eq $m.Role \"user\" }}" + turn("user") + system_part + "{{ $m.Content }}" + close
        + "{{ if $last }}" + turn("model") + "{{ end }}"
        + "{{- else if eq $m.Role \"assistant\" }}" + turn("model") + "{{ $m.Content }}{{ if not $last }}" + close
        + "{{ end }}{{ end }}{{ end }}"
    )
    return OllamaTemplate("gemma", template)


def _phi3(render: Render) -> OllamaTemplate:
    """<|role|>SEP content <|end|>CLOSE; SEP and CLOSE are newlines in Phi-3/3.5, empty in Phi-4-mini."""
    text = _probe(render, [{"role": "user", "content": _U1}], True) or ""
    match = re.search(r"<\|user\|>(?P<sep>\s*)" + _U1 + r"<\|end\|>(?P<close>\s*)<\|assistant\|>", text)
    if not match:
        raise ExportError("could not read the Phi-3 chat format from the model's template",
                          where="tokenizer chat_template", fix="export with --format gguf and write the TEMPLATE by hand")
    sep, close = match.group("sep"), "<|end|>" + match.group("close")
    turn = "<|{{ $m.Role }}|>" + sep + "{{ $m.Content }}"
    template = ("{{- range $i, $m := .Messages }}" + _LAST + turn
                + "{{ if or (not $last) (ne $m.Role \"assistant\") }}" + close + "{{ end }}"
                + "{{ if and $last (ne $m.Role \"assistant\") }}<|assistant|>" + sep + "{{ end }}{{ end }}")
    return OllamaTemplate("phi3", template)


_BUILDERS = {"chatml": _chatml, "llama3": _llama3, "mistral": _mistral, "gemma": _gemma, "phi3": _phi3}


def ollama_template(chat_template: str | None, render: Render, end_tokens: list[str]) -> OllamaTemplate:
    """Go template, default system prompt and stop strings for a model's chat template."""
    family = detect_family(chat_template)
    result = _BUILDERS[family](render)
    stops = []
    for token in [*end_tokens, *_FAMILY_STOPS[family]]:
        if token and token not in stops:
            stops.append(token)
    result.stops = stops
    return result


def _quoted(text: str) -> str:
    """A Modelfile value in triple quotes (the only form that allows newlines)."""
    if '"""' in text:
        raise ExportError("a chat template or system prompt contains \"\"\", which a Modelfile cannot quote",
                          where="Modelfile", fix="remove the triple quote from the system prompt")
    return f'"""{text}"""'


def modelfile_text(gguf_name: str, template: OllamaTemplate, *, adapter_name: str | None = None,
                   parameters: dict[str, object] | None = None) -> str:
    """The Modelfile: FROM (and ADAPTER), TEMPLATE, SYSTEM, one PARAMETER stop per stop string."""
    lines = [f"FROM ./{gguf_name}"]
    if adapter_name:
        lines.append(f"ADAPTER ./{adapter_name}")
    lines.append(f"TEMPLATE {_quoted(template.template)}")
    if template.system:
        lines.append(f"SYSTEM {_quoted(template.system)}")
    for stop in template.stops:
        lines.append(f'PARAMETER stop "{_escape(stop)}"')
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def create_command(model_name: str, modelfile_path) -> str:
    """The command a user runs to register the export with Ollama."""
    return f"ollama create {model_name} -f {modelfile_path}"


def ollama_model_name(text: str) -> str:
    """A valid Ollama model name from a folder name (lowercase letters, digits, - _ .)."""
    name = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-._")
    return name or "homebake-model"
