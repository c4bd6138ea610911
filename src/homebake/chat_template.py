"""Render a model's chat template the way transformers' ``apply_chat_template`` does, but sandboxed.

Chat templates ship inside model files, so they are untrusted code. They run in Jinja's
``ImmutableSandboxedEnvironment`` (no ``_``-prefixed attributes, no mutation of the data passed in,
no loader, so no ``include``/``import``), with the helpers real templates call: ``raise_exception``,
``strftime_now``, an HF-compatible ``tojson`` filter, ``namespace``, ``dict``, loop controls and the
``{% generation %}`` block. Every failure becomes a one-line ``TemplateError`` naming the template source.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from homebake.errors import TemplateError

class _RaisedByTemplate(Exception):
    """The template called ``raise_exception(message)`` on purpose."""


def _raise_exception(message: Any) -> None:
    raise _RaisedByTemplate(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes and sorts keys; templates are written against HF's json.dumps version.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(date_format: str) -> str:
    return datetime.now().strftime(date_format)


def _plain_dict(*args: Any, **kwargs: Any) -> dict:
    # Exposed as `dict` without exposing the `dict` type object itself (and its class attributes).
    return dict(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace()`` that refuses ``_``-prefixed names, which could shadow Python internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - mirrors jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (HF's assistant-mask marker): renders its body unchanged.

    homebake derives loss masks by rendering prefix by prefix, so the marker only has to parse.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

    @staticmethod
    def _render_body(caller: Any) -> str:
        return caller()


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """Jinja's sandbox returns an Undefined for a blocked attribute, which prints as "" (so
    ``"{0.__class__}".format(1)`` renders silently); refusing at once makes a hostile template fail loudly."""

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")


def _new_environment() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        namespace=_Namespace,
        dict=_plain_dict,
    )
    return env


_ENVIRONMENT = _new_environment()


@functools.lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    return _ENVIRONMENT.from_string(template)


def compile_template(template: str, *, source: str = "chat template") -> jinja2.Template:
    """Compile (cached by template text) or raise ``TemplateError`` naming ``source`` and the line."""
    if not isinstance(template, str):
        raise TemplateError(f"chat template must be a string, got {type(template).__name__}", where=source,
                            fix="set the chat template to Jinja text")
    try:
        return _compile(template)
    except jinja2.TemplateSyntaxError as error:
        raise TemplateError(f"chat template syntax error: {error.message}", where=f"{source} line {error.lineno}",
                            fix="fix the Jinja syntax of the template or use the model's original one") from None


def render_template(
    template: str,
    *,
    messages: list[Mapping[str, Any]],
    add_generation_prompt: bool = False,
    tools: list[Mapping[str, Any]] | None = None,
    documents: list[Mapping[str, Any]] | None = None,
    source: str = "chat template",
    **variables: Any,
) -> str:
    """Render ``template`` with the variables HF passes (``messages``, ``add_generation_prompt``,
    ``tools``, ``documents``, plus ``variables`` such as ``bos_token``/``eos_token``/``date_string``).

    Messages are copied to plain JSON data first, and keys whose value is None are dropped (as
    transformers does), so templates test ``'tool_calls' in message`` the same way in both.
    """
    compiled = compile_template(template, source=source)
    context = {
        "messages": [_without_none_values(_plain(message, source)) for message in messages],
        "tools": _plain(tools, source),
        "documents": _plain(documents, source),
        "add_generation_prompt": bool(add_generation_prompt),
        **{name: _plain(value, source) for name, value in variables.items()},
    }
    try:
        return compiled.render(**context)
    except _RaisedByTemplate as error:
        raise TemplateError(f"chat template refused the conversation: {error}", where=_where(source, error),
                            fix="make the conversation fit this model's template (roles, order, fields)") from None
    except jinja2.exceptions.SecurityError as error:
        raise TemplateError(f"chat template attempted an unsafe operation: {error}", where=_where(source, error),
                            fix="do not use this template; templates may only format the conversation") from None
    except Exception as error:  # any other failure comes from the template text or the data it was given
        raise TemplateError(f"chat template failed: {type(error).__name__}: {error}", where=_where(source, error),
                            fix="check the conversation's fields against what the template expects") from None


def _where(source: str, error: BaseException) -> str:
    line = None
    traceback = error.__traceback__
    while traceback is not None:  # the innermost template frame is the line that failed
        if traceback.tb_frame.f_code.co_filename == "<template>":  # Jinja's name for from_string code
            line = traceback.tb_lineno
        traceback = traceback.tb_next
    return f"{source} line {line}" if line else source


def _plain(value: Any, source: str) -> Any:
    """A copy of ``value`` made only of JSON types, so templates can't reach methods of rich objects."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, Mapping):
        return {_plain(key, source): _plain(item, source) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item, source) for item in value]
    raise TemplateError(f"chat template input holds a {type(value).__name__}, not JSON data", where=source,
                        fix="pass messages, tools and documents as plain JSON values (str, number, list, dict)")


def _without_none_values(message: Any) -> Any:
    if isinstance(message, dict):
        return {key: value for key, value in message.items() if value is not None}
    return message
