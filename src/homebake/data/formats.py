"""Read dataset files and normalise every supported example format to one `Conversation`.

Inputs: JSONL, JSON (an array, or an object holding a list), CSV, Parquet, folders of those, and hub
datasets (through the optional `datasets` package). Formats, detected per file unless configured:
OpenAI ``messages``, ShareGPT ``conversations``, Alpaca, ``prompt``/``completion`` and plain ``text``;
and preference pairs (``preference``): ``{"prompt", "chosen", "rejected"}`` with strings or message lists,
or ``{"chosen": messages, "rejected": messages}`` whose shared leading turns are the prompt.

Every bad example becomes a `RecordError` (a DataError with a short ``kind`` used for per-reason counts)
naming ``file:line``; the caller decides whether to skip it or stop (`SkipLog`). Nothing a user can put
in a file raises anything else.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..errors import DataError

ROLES = ("system", "user", "assistant", "tool")
CANONICAL_FIELDS = ("messages", "conversations", "role", "content", "from", "value", "tools", "system",
                    "instruction", "input", "output", "prompt", "completion", "text", "chosen", "rejected")
# Role names found in the wild that mean one of ours without any configuration.
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "developer": "system"}
SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")
FIX_FIELDS = "fix the example, or map your field names with data.fields (see `homebake data check --help`)"


class RecordError(DataError):
    """One unusable example. ``kind`` is the short reason used to count skips ("invalid JSON", ...)."""

    def __init__(self, kind: str, detail: str = "", *, where: str, fix: str | None = None):
        super().__init__(f"{kind}: {detail}" if detail else kind, where=where, fix=fix)
        self.kind = kind
        self.detail = detail


@dataclass
class Conversation:
    """One normalised example.

    Chat examples have ``messages`` (dicts with ``role`` in ROLES and a string ``content``; assistant
    turns may carry ``tool_calls``, tool turns ``name``/``tool_call_id``) and optional ``tools``.
    Plain-text examples (continued pre-training) have ``text`` and no messages.
    A preference pair has ``messages`` = prompt + chosen reply, ``rejected`` = prompt + rejected reply, and
    ``prompt_turns``: how many leading messages are the shared prompt (only the turns after it are trained).
    """

    messages: list[dict[str, Any]]
    source: str
    format: str
    tools: list[dict[str, Any]] | None = None
    text: str | None = None
    rejected: list[dict[str, Any]] | None = None
    prompt_turns: int = 0

    @property
    def is_text(self) -> bool:
        return self.text is not None

    @property
    def is_pair(self) -> bool:
        return self.rejected is not None

    def key(self) -> str:
        """Canonical serialisation: equal keys mean exact duplicates."""
        parts = [self.messages, self.tools, self.text] + ([self.rejected] if self.rejected is not None else [])
        return json.dumps(parts, sort_keys=True, ensure_ascii=False)


@dataclass
class Skipped:
    source: str
    kind: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.source}: {self.kind}" + (f": {self.detail}" if self.detail else "")


@dataclass
class SkipLog:
    """Collects skipped examples; in strict mode the first one is raised instead."""

    strict: bool = False
    items: list[Skipped] = field(default_factory=list)

    def add(self, error: RecordError) -> None:
        if self.strict:
            raise error
        self.items.append(Skipped(error.where or "?", error.kind, error.detail))

    def counts(self) -> Counter:
        return Counter(item.kind for item in self.items)


# --------------------------------------------------------------------------------------------------
# Parsing one record


@dataclass(frozen=True)
class FieldNames:
    """Canonical field name -> the name used in the user's files."""

    mapping: dict[str, str] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str:
        return self.mapping.get(name, name)


def detect_format(record: Any, names: FieldNames = FieldNames()) -> str | None:
    """The format a record looks like, or None. Order matters: richer formats win."""
    if not isinstance(record, dict):
        return None
    if names["chosen"] in record and names["rejected"] in record:
        return "preference"
    if names["messages"] in record:
        return "messages"
    if names["conversations"] in record:
        return "sharegpt"
    if names["instruction"] in record and names["output"] in record:
        return "alpaca"
    if names["prompt"] in record and names["completion"] in record:
        return "completion"
    if names["text"] in record:
        return "text"
    return None


def parse_record(record: Any, fmt: str, source: str, names: FieldNames = FieldNames(),
                 roles: dict[str, str] | None = None) -> Conversation:
    """Normalise one example of format ``fmt`` ("auto" detects it); raises RecordError, nothing else."""
    if not isinstance(record, dict):
        raise RecordError("wrong type", f"example is {_type_name(record)}, expected an object", where=source,
                          fix="each line/item must be a JSON object")
    if fmt == "auto":
        fmt = detect_format(record, names) or ""
        if not fmt:
            raise RecordError("unrecognised example", f"fields {_keys(record)}", where=source, fix=FIX_FIELDS)
    parser = _PARSERS[fmt]
    return parser(_Record(record, source, names, {**ROLE_ALIASES, **(roles or {})}), fmt)


@dataclass
class _Record:
    data: dict
    source: str
    names: FieldNames
    roles: dict[str, str]

    def error(self, kind: str, detail: str = "", fix: str | None = FIX_FIELDS) -> RecordError:
        return RecordError(kind, detail, where=self.source, fix=fix)

    def get(self, name: str, *, required: bool, where: str = "") -> Any:
        key = self.names[name]
        value = self.data.get(key)
        if value is None and required:
            raise self.error("missing field", f"{where}no {key!r}")
        return value

    def string(self, name: str, *, required: bool, allow_empty: bool = False) -> str | None:
        value = self.get(name, required=required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise self.error("wrong type", f"{self.names[name]!r} is {_type_name(value)}, expected a string")
        if not isinstance(value, str):  # CSV/Parquet numbers in a text column
            value = _number_text(value)
        if required and not allow_empty and not value.strip():
            raise self.error("empty field", f"{self.names[name]!r} is empty")
        return value

    def listing(self, name: str, *, required: bool) -> list | None:
        value = self.get(name, required=required)
        if isinstance(value, str):  # CSV cells hold lists as JSON text
            try:
                value = json.loads(value)
            except (ValueError, RecursionError):
                raise self.error("wrong type", f"{self.names[name]!r} is a string, expected a list") from None
        if value is None:
            return None
        if not isinstance(value, list):
            raise self.error("wrong type", f"{self.names[name]!r} is {_type_name(value)}, expected a list")
        return value


def _parse_messages(rec: _Record, fmt: str) -> Conversation:
    name = "messages" if fmt == "messages" else "conversations"
    raw = rec.listing(name, required=True)
    messages = [_message(rec, item, i) for i, item in enumerate(raw)]
    system = rec.string("system", required=False)  # ShareGPT exports often keep the system prompt apart
    if system and system.strip() and not (messages and messages[0]["role"] == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return _conversation(rec, fmt, messages, tools=_tools(rec))


def _parse_alpaca(rec: _Record, fmt: str) -> Conversation:
    instruction = rec.string("instruction", required=True)
    extra = rec.string("input", required=False)
    output = rec.string("output", required=True, allow_empty=True)
    if not output.strip():
        raise rec.error("empty assistant content", f"{rec.names['output']!r} is empty",
                        fix="remove the example or give it an answer")
    user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
    return _conversation(rec, fmt, _with_system(rec, [{"role": "user", "content": user},
                                                      {"role": "assistant", "content": output}]))


def _parse_completion(rec: _Record, fmt: str) -> Conversation:
    messages = []
    for name, role in (("prompt", "user"), ("completion", "assistant")):
        value = rec.get(name, required=True)
        if isinstance(value, list):  # conversational prompt/completion (lists of messages)
            messages += [_message(rec, item, len(messages) + i) for i, item in enumerate(value)]
        else:
            text = rec.string(name, required=True, allow_empty=True)
            if role == "assistant" and not text.strip():
                raise rec.error("empty assistant content", f"{rec.names[name]!r} is empty",
                                fix="remove the example or give it a completion")
            messages.append({"role": role, "content": text})
    return _conversation(rec, fmt, _with_system(rec, messages), tools=_tools(rec))


def _parse_text(rec: _Record, fmt: str) -> Conversation:
    text = rec.string("text", required=True)
    return Conversation(messages=[], source=rec.source, format=fmt, text=text)


def _parse_preference(rec: _Record, fmt: str) -> Conversation:
    """A preference pair: an explicit ``prompt`` (text or messages) with ``chosen``/``rejected`` replies (text or
    messages), or ``chosen``/``rejected`` whole conversations whose shared leading messages are the prompt."""
    prompt_value = rec.get("prompt", required=False)
    sides = {}
    for name in ("chosen", "rejected"):
        value = rec.get(name, required=True)
        if isinstance(value, list):
            sides[name] = [_message(rec, item, i) for i, item in enumerate(value)]
        else:
            text = rec.string(name, required=True, allow_empty=True)
            if not text.strip():
                raise rec.error("empty assistant content", f"{rec.names[name]!r} is empty",
                                fix="remove the pair or give both replies text")
            if prompt_value is None:
                raise rec.error("missing field", f"no {rec.names['prompt']!r}: a {name} reply given as text needs "
                                "one", fix="add the prompt, or give chosen/rejected as message lists that share "
                                "the prompt turns")
            sides[name] = [{"role": "assistant", "content": text}]
    if prompt_value is None:  # implicit prompt: the leading messages both conversations share
        shared = _shared_prefix(sides["chosen"], sides["rejected"])
        prompt, raw = sides["chosen"][:shared], {name: messages[shared:] for name, messages in sides.items()}
    else:
        if isinstance(prompt_value, list):
            prompt = [_message(rec, item, i) for i, item in enumerate(prompt_value)]
        else:
            prompt = [{"role": "user", "content": rec.string("prompt", required=True)}]
        # a reply that repeats the prompt turns at its start keeps only what follows them
        raw = {name: messages[len(prompt):] if messages[:len(prompt)] == prompt else messages
               for name, messages in sides.items()}
    if not prompt:
        raise rec.error("no prompt", "chosen and rejected share no leading turn",
                        fix="add a 'prompt' field, or start both conversations with the same user turn")
    prompt = _with_system(rec, prompt)
    replies = {}
    for name, messages in raw.items():
        if not messages:
            raise rec.error("no reply", f"{rec.names[name]!r} has no turn after the prompt",
                            fix="give chosen and rejected different replies after the same prompt turns")
        if not any(m["role"] == "assistant" for m in messages):
            raise rec.error("no assistant turn", f"{rec.names[name]!r} has no assistant reply",
                            fix="end chosen and rejected with an assistant reply")
        replies[name] = messages
    if replies["chosen"] == replies["rejected"]:
        raise rec.error("identical replies", "chosen and rejected are the same", fix="remove the pair")
    chosen = _conversation(rec, fmt, prompt + replies["chosen"], tools=_tools(rec))
    _conversation(rec, fmt, prompt + replies["rejected"])  # the same checks on the rejected side
    chosen.rejected = prompt + replies["rejected"]
    chosen.prompt_turns = len(prompt)
    return chosen


def _shared_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


_PARSERS = {"messages": _parse_messages, "sharegpt": _parse_messages, "alpaca": _parse_alpaca,
            "completion": _parse_completion, "text": _parse_text, "preference": _parse_preference}


def _with_system(rec: _Record, messages: list[dict]) -> list[dict]:
    system = rec.string("system", required=False)
    if system and system.strip() and messages[0]["role"] != "system":
        return [{"role": "system", "content": system}, *messages]
    return messages


def _message(rec: _Record, item: Any, index: int) -> dict[str, Any]:
    where = f"message {index}: "
    if not isinstance(item, dict):
        raise rec.error("wrong type", f"{where}is {_type_name(item)}, expected an object")
    # Accept both role/content and ShareGPT's from/value inside either list.
    role_key, content_key = rec.names["role"], rec.names["content"]
    if role_key not in item and rec.names["from"] in item:
        role_key, content_key = rec.names["from"], rec.names["value"]
    role = item.get(role_key)
    if role is None:
        raise rec.error("missing role", f"{where}no {role_key!r}")
    if not isinstance(role, str):
        raise rec.error("wrong type", f"{where}{role_key!r} is {_type_name(role)}, expected a string")
    canonical = role if role in ROLES else rec.roles.get(role)
    if canonical not in ROLES:
        known = ", ".join([*ROLES, *sorted(rec.roles)])
        raise rec.error("unknown role", f"{where}{_clip(role)!r}",
                        fix=f"use one of {known}, or map it with data.roles (e.g. {{{_clip(role)}: assistant}})")
    content = _content_text(rec, item.get(content_key), f"{where}{content_key!r}")
    message: dict[str, Any] = {"role": canonical, "content": content}
    tool_calls = item.get("tool_calls")
    if canonical == "assistant" and tool_calls is not None:
        if not isinstance(tool_calls, list) or not all(isinstance(c, dict) for c in tool_calls):
            raise rec.error("wrong type", f"{where}'tool_calls' must be a list of objects")
        message["tool_calls"] = tool_calls
    if canonical == "tool":
        for key in ("name", "tool_call_id"):
            if isinstance(item.get(key), str):
                message[key] = item[key]
    if canonical == "assistant" and not content.strip() and not message.get("tool_calls"):
        raise rec.error("empty assistant content", f"{where}has no text",
                        fix="remove the example or the empty assistant turn")
    return message


def _content_text(rec: _Record, content: Any, where: str) -> str:
    """Message content as text: strings, or OpenAI's list of {type: text, text} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else _type_name(part)
                raise rec.error("unsupported content", f"{where} has a {_clip(str(kind))!r} part; only text is "
                                "supported", fix="remove non-text parts (images, audio) from the example")
        return "".join(parts)
    raise rec.error("wrong type", f"{where} is {_type_name(content)}, expected a string")


def _tools(rec: _Record) -> list[dict] | None:
    tools = rec.listing("tools", required=False)
    if tools is not None and not all(isinstance(tool, dict) for tool in tools):
        raise rec.error("wrong type", f"{rec.names['tools']!r} must be a list of objects")
    return tools or None


def _conversation(rec: _Record, fmt: str, messages: list[dict], tools: list | None = None) -> Conversation:
    if not messages:
        raise rec.error("no messages", "the conversation is empty", fix="remove the example")
    if not any(m["role"] == "assistant" for m in messages):
        raise rec.error("no assistant turn", "nothing to learn from", fix="add an assistant reply or remove it")
    first = next(m for m in messages if m["role"] != "system")
    if first["role"] == "assistant":
        raise rec.error("starts with assistant", "the first non-system turn must come from the user",
                        fix="add the user turn the assistant answers")
    return Conversation(messages=messages, source=rec.source, format=fmt, tools=tools)


def _type_name(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


def _keys(record: dict) -> str:
    keys = [_clip(str(k)) for k in list(record)[:8]]
    return ", ".join(keys) + (", ..." if len(record) > 8 else "") if keys else "(none)"


def _clip(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _number_text(value: int | float) -> str:
    return str(int(value)) if isinstance(value, float) and math.isfinite(value) and value.is_integer() else str(value)


# --------------------------------------------------------------------------------------------------
# Reading files: each reader yields (source, record) or (source, RecordError)


Item = tuple[str, Any]


def _read_jsonl(path: Path) -> Iterator[Item]:
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            source = f"{path}:{number}"
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # UTF-8 byte-order mark
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as error:
                yield source, _utf8_error(error, source)
                continue
            if not line.strip():
                continue
            try:
                yield source, json.loads(line)
            except (ValueError, RecursionError) as error:
                yield source, RecordError("invalid JSON", _json_detail(error), where=source,
                                          fix="each line must be one complete JSON object")


def _read_json(path: Path) -> Iterator[Item]:
    text = _decode_whole(path)
    decoder = json.JSONDecoder()
    start = _skip_space(text, 0)
    if text.startswith("[", start):
        # Walk the array item by item so each example keeps its own line number.
        index = _skip_space(text, start + 1)
        if text.startswith("]", index):
            return
        while True:
            source = f"{path}:{text.count(chr(10), 0, index) + 1}"
            try:
                value, index = decoder.raw_decode(text, index)
            except (ValueError, RecursionError) as error:
                raise _json_file_error(path, text, error) from None
            yield source, value
            index = _skip_space(text, index)
            if text.startswith(",", index):
                index = _skip_space(text, index + 1)
            elif text.startswith("]", index) and not text[_skip_space(text, index + 1):].strip():
                return
            else:
                line = text.count("\n", 0, index) + 1
                raise RecordError("invalid JSON", "expected ',' or ']' after an array item",
                                  where=f"{path}:{line}", fix="fix the JSON syntax")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise _json_file_error(path, text, error) from None
    if isinstance(data, dict) and detect_format(data) is None:
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) == 1:
            for i, value in enumerate(data[lists[0]]):
                yield f"{path}:{lists[0]}[{i}]", value
            return
        raise RecordError("unrecognised JSON layout",
                          f"expected an array of examples or an object with one list, found keys {_keys(data)}",
                          where=str(path), fix="store the examples as a JSON array or as JSON Lines")
    yield f"{path}:1", data  # a single example


def _read_csv(path: Path) -> Iterator[Item]:
    # surrogateescape keeps undecodable bytes visible per row, so one bad row does not sink the file.
    text = path.read_bytes().removeprefix(b"\xef\xbb\xbf").decode("utf-8", errors="surrogateescape")
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 28))  # whole conversations can sit in one cell
    try:
        reader = csv.reader(io.StringIO(text, newline=""))
        header = next(reader, None)
        if header is None:
            return
        if len(set(header)) != len(header):
            raise RecordError("bad CSV header", f"duplicate column names in {header}", where=f"{path}:1",
                              fix="give every column a distinct name")
        line = reader.line_num + 1
        for row in reader:
            source, line = f"{path}:{line}", reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if any(_has_surrogates(cell) for cell in row):
                yield source, RecordError("not UTF-8", "the row contains bytes that are not valid UTF-8",
                                          where=source, fix="save the file as UTF-8")
            elif len(row) != len(header):
                yield source, RecordError("bad CSV row", f"{len(row)} cells for {len(header)} columns",
                                          where=source, fix="quote cells that contain commas or newlines")
            else:
                yield source, dict(zip(header, row))
    except csv.Error as error:
        raise RecordError("bad CSV", str(error), where=f"{path}:{reader.line_num}",
                          fix="check the quoting of that line") from None


def _read_parquet(path: Path) -> Iterator[Item]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet needs the optional pyarrow package", where=str(path),
                        fix="pip install 'homebake[data]'") from None
    try:
        reader = pq.ParquetFile(path)
        row = 0
        for batch in reader.iter_batches(batch_size=1024):
            for value in batch.to_pylist():
                row += 1
                yield f"{path}:row {row}", value
    except (OSError, ValueError) as error:  # pyarrow's ArrowException subclasses these
        raise DataError(f"unreadable Parquet file: {error}", where=str(path),
                        fix="check that the file is a complete Parquet file") from None


_READERS = {".jsonl": _read_jsonl, ".ndjson": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
            ".parquet": _read_parquet}


def _read_hub(dataset_id: str, split: str) -> Iterator[Item]:
    try:
        import datasets
    except ImportError:
        raise DataError("reading hub datasets needs the optional `datasets` package", where=dataset_id,
                        fix="pip install 'homebake[data]', or download the data and pass the file") from None
    try:
        rows = datasets.load_dataset(dataset_id, split=split)
    except Exception as error:  # the library raises many kinds; all mean "could not get this dataset"
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise DataError(f"not a local file or folder, and not loadable as a hub dataset: {first}",
                        where=f"{dataset_id}[{split}]",
                        fix="check the path, or the hub id and split (and that it is cached or the hub is reachable)"
                        ) from None
    for number, row in enumerate(rows, start=1):
        yield f"{dataset_id}[{split}]:row {number}", row


def _decode_whole(path: Path) -> str:
    data = path.read_bytes().removeprefix(b"\xef\xbb\xbf")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise _utf8_error(error, f"{path}:{line}") from None


def _utf8_error(error: UnicodeDecodeError, source: str) -> RecordError:
    byte = error.object[error.start:error.start + 1].hex()
    return RecordError("not UTF-8", f"byte 0x{byte} at offset {error.start} is not valid UTF-8", where=source,
                       fix="save the file as UTF-8")


def _json_detail(error: Exception) -> str:
    if isinstance(error, json.JSONDecodeError):
        return f"{error.msg} (column {error.colno})"
    return "nested too deeply" if isinstance(error, RecursionError) else str(error)


def _json_file_error(path: Path, text: str, error: Exception) -> RecordError:
    line = error.lineno if isinstance(error, json.JSONDecodeError) else 1
    return RecordError("invalid JSON", _json_detail(error), where=f"{path}:{line}",
                       fix="fix the JSON syntax, or use JSON Lines (one example per line)")


def _skip_space(text: str, index: int) -> int:
    while index < len(text) and text[index] in " \t\r\n":
        index += 1
    return index


def _has_surrogates(text: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in text)


# --------------------------------------------------------------------------------------------------
# Sources: files, folders and hub ids


def expand_sources(spec: str) -> list[Path] | str:
    """Files behind a path (a folder expands to its supported files), or the hub id as a string."""
    hub_prefix = "hf:"
    if spec.startswith(hub_prefix):
        return spec[len(hub_prefix):]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and _suffix(p) in _READERS
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise DataError("no data files in folder", where=str(path),
                            fix=f"put {', '.join(SUFFIXES)} files in it")
        return files
    if path.is_file():
        if _suffix(path) not in _READERS:
            raise DataError(f"unsupported file type {path.suffix or '(none)'!r}", where=str(path),
                            fix=f"use one of {', '.join(SUFFIXES)}")
        return [path]
    if _looks_like_hub_id(spec):
        return spec
    raise DataError("no such file or folder", where=spec, fix="check the path")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (len(parts) == 2 and all(parts) and not spec.startswith((".", "~"))
            and Path(spec).suffix.lower() not in _READERS)


def _suffix(path: Path) -> str:
    return path.suffix.lower()


@dataclass
class LoadedConversations:
    conversations: list[Conversation]
    formats: dict[str, str]  # file (or hub id) -> detected/configured format
    records: int  # examples read (including ones later skipped)


def load_conversations(specs: Iterable[str], *, fmt: str = "auto", fields: dict[str, str] | None = None,
                       roles: dict[str, str] | None = None, hub_split: str = "train",
                       log: SkipLog | None = None) -> LoadedConversations:
    """Read every source and normalise its examples; bad ones go to ``log`` (raised when strict)."""
    log = log if log is not None else SkipLog()
    names = FieldNames(dict(fields or {}))
    result = LoadedConversations([], {}, 0)
    for spec in specs:
        sources = expand_sources(str(spec))
        if isinstance(sources, str):
            result.formats[sources] = _load_one(_read_hub(sources, hub_split), sources, fmt, names, roles, log,
                                                result)
            continue
        for path in sources:
            if _is_empty(path):
                log.add(RecordError("empty file", where=str(path), fix="remove it or add examples"))
                continue
            items = _READERS[_suffix(path)](path)
            result.formats[str(path)] = _load_one(items, str(path), fmt, names, roles, log, result)
    return result


def _is_empty(path: Path) -> bool:
    size = path.stat().st_size
    # Only small files can be all whitespace worth reporting as empty; big ones are read anyway.
    return size == 0 or (size < 4096 and _suffix(path) != ".parquet" and not path.read_bytes().strip())


def _load_one(items: Iterator[Item], label: str, fmt: str, names: FieldNames, roles: dict | None,
              log: SkipLog, result: LoadedConversations) -> str:
    """Parse one file's items; the format is fixed by the first recognisable example (or the config)."""
    file_format = fmt if fmt != "auto" else ""
    try:
        for source, value in items:
            result.records += 1
            if isinstance(value, RecordError):
                log.add(value)
                continue
            try:
                if not file_format:
                    file_format = detect_format(value, names) or ""
                result.conversations.append(
                    parse_record(value, file_format or "auto", source, names, roles))
            except RecordError as error:
                log.add(error)
    except RecordError as error:  # the whole file (or its remainder) is unreadable
        log.add(error)
    return file_format or "unknown"
