"""`homebake generate` (one prompt) and `homebake chat` (interactive, streamed)."""

from __future__ import annotations

import sys

from .common import add_adapter_arg, add_model_args, load_for_inference


def _add_sampling_args(parser) -> None:
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy (deterministic)")
    parser.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (1 disables)")
    parser.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (0 disables)")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="stop after this many new tokens")
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    parser.add_argument("--system", default=None, help="system prompt (chat-template models)")


def register(subparsers) -> None:
    gen = subparsers.add_parser("generate", help="generate a reply to one prompt",
                                description="Generate text for one prompt, streamed to stdout. "
                                            "Example: homebake generate --prompt 'What is the capital of France?'")
    add_model_args(gen)
    add_adapter_arg(gen)
    gen.add_argument("--prompt", "-p", required=True, help="the user message (or raw text with --raw)")
    gen.add_argument("--raw", action="store_true", help="continue the text as-is, without the chat template")
    _add_sampling_args(gen)
    gen.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="chat with a model in the terminal",
                                 description="Interactive chat using the model's own chat template. "
                                             "Type /reset to start over, /exit or Ctrl-D to quit.")
    add_model_args(chat)
    add_adapter_arg(chat)
    _add_sampling_args(chat)
    chat.set_defaults(func=run_chat)


def _sampling(args):
    from ..generate import SamplingConfig

    config = SamplingConfig(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            max_new_tokens=args.max_new_tokens, seed=args.seed)
    config.validate()
    return config


def _system(args) -> list[dict]:
    return [{"role": "system", "content": args.system}] if args.system else []


def _stream_reply(loaded, prompt_ids: list[int], sampling) -> str:
    from ..generate import generate_ids, stream_text

    pieces = []
    for piece in stream_text(loaded.tokenizer, generate_ids(loaded.model, prompt_ids, sampling,
                                                             loaded.tokenizer.end_token_ids)):
        pieces.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(pieces)


def run_generate(args) -> int:
    sampling = _sampling(args)
    loaded = load_for_inference(args)
    tokenizer = loaded.tokenizer
    if args.raw or not tokenizer.chat_template:
        prompt_ids = tokenizer.encode(args.prompt, add_special_tokens=True)
    else:
        messages = _system(args) + [{"role": "user", "content": args.prompt}]
        prompt_ids = tokenizer.encode_chat(messages, add_generation_prompt=True)
    _stream_reply(loaded, prompt_ids, sampling)
    return 0


def run_chat(args) -> int:
    sampling = _sampling(args)
    loaded = load_for_inference(args)
    tokenizer = loaded.tokenizer
    if not tokenizer.chat_template:
        from ..errors import TokenizerError

        raise TokenizerError("this model has no chat template", where=str(loaded.source_path),
                             fix="use `homebake generate --raw` for a base model, or a model with a chat template")
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"homebake chat — {loaded.source_path.name}. /reset starts over, /exit or Ctrl-D quits.")
    messages = _system(args)
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = _system(args)
            continue
        messages.append({"role": "user", "content": text})
        if interactive:
            sys.stdout.write("bot> ")
        reply = _stream_reply(loaded, tokenizer.encode_chat(messages, add_generation_prompt=True), sampling)
        messages.append({"role": "assistant", "content": reply})
    return 0
