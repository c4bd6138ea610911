"""Answers from an exported GGUF through llama.cpp's own runtime and chat handling (llama-cpp-python).

The file a person runs in llama.cpp, Ollama or LM Studio is the GGUF, not homebake's merged weights. Its
chat template, end tokens and quantisation come from the file, so ``homebake compare --gguf FILE`` asks it the
same held-out questions through llama-cpp-python's ``create_chat_completion`` (the file's own template via its
Jinja chat formatter, greedy: temperature 0, no repeat penalty) and scores the answers exactly like homebake's:
a template or EOS problem in the export then shows up as a number (exact match, answers ended by the end token).

llama-cpp-python is an optional extra (it compiles llama.cpp on install); without it this says how to install it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

from .errors import ConfigError, ModelLoadError

INSTALL_HINT = ('pip install "homebake[llamacpp]" (compiles llama.cpp, ~13 min on 2 cores; where the native build '
                'dies with "Illegal instruction": CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON '
                '-DGGML_F16C=ON" pip install llama-cpp-python)')


def llama_cpp_module():
    """The llama_cpp module, or None when llama-cpp-python is not installed (or does not import)."""
    try:
        import llama_cpp
    except Exception:  # noqa: BLE001 - a broken build raises anything from OSError to RuntimeError
        return None
    return llama_cpp


def available() -> bool:
    return llama_cpp_module() is not None


def missing_message() -> str:
    return f"llama-cpp-python is not installed, so the GGUF was not scored in llama.cpp; to score it: {INSTALL_HINT}"


def runtime_name() -> str:
    module = llama_cpp_module()
    version = getattr(module, "__version__", "?") if module else None
    return f"llama.cpp (llama-cpp-python {version})" if module else "llama.cpp (not installed)"


@dataclass
class LlamaAnswer:
    text: str
    completion_tokens: int
    prompt_tokens: int
    stopped: bool  # llama.cpp's finish_reason was "stop" (an end token), not "length"


def chat_answers(path: str, requests: Sequence[tuple[list[dict], list | None]], max_tokens: int, *,
                 n_ctx: int = 2048, threads: int | None = None,
                 progress: Callable[[int], None] | None = None) -> list[LlamaAnswer]:
    """Greedy chat completions of ``requests`` ((messages, tools) each) by the GGUF at ``path`` in llama.cpp."""
    module = llama_cpp_module()
    if module is None:
        raise ConfigError("llama-cpp-python is not installed", where="--gguf", fix=INSTALL_HINT)
    if not os.path.isfile(path):
        raise ModelLoadError("no such GGUF file", where=str(path), fix="pass the .gguf that homebake export wrote")
    try:
        llm = module.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count() or 1,
                           n_batch=min(512, n_ctx), seed=0, verbose=False)
    except (ValueError, RuntimeError, OSError) as error:
        raise ModelLoadError(f"llama.cpp cannot load the file ({' '.join(str(error).split())[:160]})",
                             where=str(path), fix="re-export it with homebake export --format gguf") from None
    answers = []
    try:
        for index, (messages, tools) in enumerate(requests):
            extra = {"tools": tools} if tools else {}
            reply = llm.create_chat_completion(messages=messages, max_tokens=max_tokens, temperature=0.0, top_k=1,
                                               top_p=1.0, min_p=0.0, repeat_penalty=1.0, seed=0, **extra)
            choice = reply["choices"][0]
            usage = reply.get("usage") or {}
            answers.append(LlamaAnswer(str(choice["message"].get("content") or "").strip(),
                                       int(usage.get("completion_tokens", 0)), int(usage.get("prompt_tokens", 0)),
                                       choice.get("finish_reason") == "stop"))
            if progress is not None:
                progress(index + 1)
    finally:
        close = getattr(llm, "close", None)
        if close is not None:
            close()
    return answers
