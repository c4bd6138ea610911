"""Fuzzed inputs a user hands homebake: safetensors headers, config.json, tokenizer files, adapter_config.json, YAML
training configs and dataset lines. Each is mutated from a real, valid file (plus arbitrary bytes) in 2,000 cases;
every case either works or raises a HomebakeError (one line), and none allocates more than the file justifies."""

from __future__ import annotations

import json
import resource
import struct
import sys
from pathlib import Path

import pytest
from conftest import fuzz_tally
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homebake.errors import HomebakeError

CASES = 2000
FUZZ = settings(max_examples=CASES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
INTERESTING_INTS = st.sampled_from([0, 1, 2, 3, -1, -2, 7, 63, 64, 65, 320, 2**31 - 1, 2**31, 2**32, 2**40, 2**53,
                                    2**63, 2**64, -(2**63), 10**30])
NUMBERS = INTERESTING_INTS | st.integers() | st.floats(allow_nan=True, allow_infinity=True)
SCALARS = st.none() | st.booleans() | NUMBERS | st.text(max_size=12) | st.sampled_from(
    ["", "llama", "qwen2", "qwen3", "mistral", "silu", "gelu", "default", "linear", "llama3", "dynamic",
     "<|im_end|>", "<|im_start|>", "<pad>", "{{ messages }}", "{% for m in messages %}{{ m.content }}{% endfor %}",
     "{{ raise_exception('no') }}", "{{ ''.__class__ }}", "{% include 'x' %}", "F32", "BF16", "I64", "U8", "BOOL",
     "F8_E4M3", "q_proj", "all-linear", "LORA", "CAUSAL_LM"])
JSON = st.recursive(SCALARS, lambda children: st.lists(children, max_size=4)
                    | st.dictionaries(st.text(max_size=10) | st.sampled_from(["type", "factor", "rope_type",
                                                                               "content", "role"]), children,
                                      max_size=4), max_leaves=12)


def check(tally, call):
    """Run ``call``: success or a one-line HomebakeError; anything else fails the test (hypothesis shrinks it)."""
    try:
        call()
        tally["accepted"] += 1
    except HomebakeError as error:
        assert "\n" not in str(error), str(error)
        tally["refused"] += 1


def dict_mutations(keys):
    """Set/delete one to three keys of a JSON object (its own keys, likely others, or random ones)."""
    key = st.sampled_from(sorted(keys)) | st.text(max_size=10)
    return st.lists(st.tuples(st.sampled_from(["set", "set", "delete"]), key, JSON), min_size=1, max_size=3)


def apply(obj: dict, steps) -> dict:
    obj = json.loads(json.dumps(obj))
    for op, key, value in steps:
        if op == "set":
            obj[key] = value
        else:
            obj.pop(key, None)
    return obj


def json_text(value) -> str:
    return json.dumps(value, allow_nan=True)


WHOLE_FILE = st.binary(max_size=300) | st.text(max_size=300).map(str.encode) | JSON.map(
    lambda v: json_text(v).encode())


def peak_rss_gib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny llama HF folder with a byte-level tokenizer (config.json, model.safetensors, tokenizer files)."""
    from tiny_models import save_byte_tokenizer, save_tiny_hf_model

    folder = tmp_path_factory.mktemp("tiny") / "model"
    save_tiny_hf_model(folder, "llama", seed=0)
    save_byte_tokenizer(folder, merges=[("a", "b")])
    return folder


def copy_folder(source: Path, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        (target / item.name).write_bytes(item.read_bytes())
    return target


@pytest.fixture(autouse=True)
def _memory_stays_bounded():
    before = peak_rss_gib()
    yield
    assert peak_rss_gib() - before < 1.0, "a fuzz case allocated far more than its input justifies"


# ----------------------------------------------------------------------------------------------- safetensors

def test_fuzzed_safetensors_headers(tiny, tmp_path_factory):
    from homebake.model.load import load_model

    folder = copy_folder(tiny, tmp_path_factory.mktemp("st"))
    raw = (tiny / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    names = sorted(k for k in header if k != "__metadata__")
    entry_value = (st.sampled_from(["F32", "F16", "BF16", "I64", "U8", "BOOL", "F64", "F8_E4M3", "U16", "C64"])
                   | st.lists(INTERESTING_INTS | st.integers(0, 300), max_size=5) | JSON)
    json_level = st.lists(st.tuples(st.sampled_from(names + ["__metadata__", "extra"]),
                                    st.sampled_from(["dtype", "shape", "data_offsets", None]), entry_value),
                          min_size=1, max_size=3)
    raw_level = st.tuples(st.sampled_from(["length", "byte", "truncate"]), INTERESTING_INTS | st.integers(0, len(raw)),
                          st.integers(0, 255))
    tally = fuzz_tally("safetensors headers")

    def build(case) -> bytes:
        if case[0] == "json":
            mutated = json.loads(json.dumps(header))
            for name, field, value in case[1]:
                if field is None:
                    mutated[name] = value
                elif isinstance(mutated.get(name), dict):
                    mutated[name][field] = value
                else:
                    mutated[name] = {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 16], field: value}
            text = json_text(mutated).encode()
            return struct.pack("<Q", len(text)) + text + body
        kind, value, byte = case[1]
        data = bytearray(raw)
        if kind == "length":
            struct.pack_into("<Q", data, 0, value % 2**64)
        elif kind == "byte":
            data[8 + value % n] = byte
        else:
            del data[value % len(raw):]
        return bytes(data)

    @FUZZ
    @given(case=st.tuples(st.just("json"), json_level) | st.tuples(st.just("raw"), raw_level))
    def run(case):
        (folder / "model.safetensors").write_bytes(build(case))
        check(tally, lambda: load_model(folder, with_tokenizer=False))

    run()
    assert sum(tally.values()) >= CASES and tally["refused"] > 0


def test_a_safetensors_header_declaring_a_2_to_the_40_element_tensor_is_refused(tiny, tmp_path):
    from homebake.errors import ModelLoadError
    from homebake.model.load import load_model

    folder = copy_folder(tiny, tmp_path / "m")
    raw = (tiny / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["shape"] = [2**20, 2**20]
    text = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(ModelLoadError) as info:
        load_model(folder, with_tokenizer=False)
    assert "model.safetensors" in str(info.value)


# ----------------------------------------------------------------------------------------------- config.json

CONFIG_KEYS = {"head_dim", "rope_scaling", "rope_parameters", "rope_theta", "sliding_window", "layer_types",
               "use_sliding_window", "max_window_layers", "attention_bias", "mlp_bias", "hidden_act", "torch_dtype",
               "num_key_value_heads", "tie_word_embeddings", "rms_norm_eps", "max_position_embeddings"}


def test_fuzzed_config_json(tiny, tmp_path_factory):
    from homebake.model.load import load_model

    folder = copy_folder(tiny, tmp_path_factory.mktemp("cfg"))
    config = json.loads((tiny / "config.json").read_text())
    tally = fuzz_tally("config.json")

    @FUZZ
    @given(case=dict_mutations(set(config) | CONFIG_KEYS).map(lambda s: json_text(apply(config, s)).encode())
           | WHOLE_FILE)
    def run(case):
        (folder / "config.json").write_bytes(case)
        check(tally, lambda: load_model(folder, with_tokenizer=False))

    run()
    assert sum(tally.values()) >= CASES and tally["refused"] > 0 and tally["accepted"] > 0


def test_a_config_declaring_2_to_the_40_layers_or_dims_is_refused_before_building(tiny, tmp_path):
    from homebake.errors import ModelLoadError
    from homebake.model.load import load_model

    folder = copy_folder(tiny, tmp_path / "m")
    config = json.loads((tiny / "config.json").read_text())
    for key in ("num_hidden_layers", "head_dim", "hidden_size", "vocab_size", "intermediate_size"):
        (folder / "config.json").write_text(json.dumps({**config, key: 2**40}))
        with pytest.raises(ModelLoadError):
            load_model(folder, with_tokenizer=False)


# ----------------------------------------------------------------------------------------------- tokenizer files

TOKENIZER_CONFIG_KEYS = {"eos_token", "bos_token", "pad_token", "unk_token", "add_bos_token", "chat_template",
                         "added_tokens_decoder", "model_max_length", "clean_up_tokenization_spaces"}


def test_fuzzed_tokenizer_files(tiny, tmp_path_factory):
    from homebake.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("tok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny / name).read_bytes())
    tokenizer_json = json.loads((tiny / "tokenizer.json").read_text())
    tokenizer_config = json.loads((tiny / "tokenizer_config.json").read_text())
    pristine = {name: (tiny / name).read_bytes() for name in ("tokenizer.json", "tokenizer_config.json")}
    tally = fuzz_tally("tokenizer files")
    files = st.sampled_from(["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "generation_config.json", "chat_template.jinja"])
    nested = st.lists(st.tuples(st.sampled_from(["model", "pre_tokenizer", "decoder", "added_tokens", "normalizer",
                                                 "post_processor"]), JSON), min_size=1, max_size=2)

    def content(case) -> tuple[str, bytes]:
        kind, name, value = case
        if kind == "config":
            return "tokenizer_config.json", json_text(apply(tokenizer_config, value)).encode()
        if kind == "tokenizer":
            mutated = json.loads(json.dumps(tokenizer_json))
            for key, new in value:
                mutated[key] = new
            return "tokenizer.json", json_text(mutated).encode()
        if kind == "template":
            return "chat_template.jinja", value.encode("utf-8", "surrogatepass")
        return name, value

    @FUZZ
    @given(case=st.tuples(st.just("config"), st.none(), dict_mutations(TOKENIZER_CONFIG_KEYS | set(tokenizer_config)))
           | st.tuples(st.just("tokenizer"), st.none(), nested)
           | st.tuples(st.just("template"), st.none(), SCALARS.filter(lambda v: isinstance(v, str)) | st.text())
           | st.tuples(st.just("whole"), files, WHOLE_FILE))
    def run(case):
        name, data = content(case)
        for pristine_name, pristine_data in pristine.items():
            (folder / pristine_name).write_bytes(pristine_data)
        for extra in ("special_tokens_map.json", "generation_config.json", "chat_template.jinja"):
            (folder / extra).unlink(missing_ok=True)
        (folder / name).write_bytes(data)

        def use():
            tokenizer = Tokenizer.from_hf_dir(folder)
            ids = tokenizer.encode("hello <|im_end|> wörld")
            tokenizer.decode(ids)
            if tokenizer.chat_template:
                tokenizer.encode_chat([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])

        check(tally, use)

    run()
    assert sum(tally.values()) >= CASES and tally["refused"] > 0 and tally["accepted"] > 0


# ----------------------------------------------------------------------------------------------- adapter_config.json

def test_fuzzed_adapter_config(tiny, tmp_path_factory):
    import torch

    from homebake.adapters.config import LoraConfig
    from homebake.adapters.lora import inject_lora, lora_state_dict
    from homebake.adapters.peft import load_peft_adapter, save_peft_adapter
    from homebake.model.load import load_model

    model = load_model(tiny, with_tokenizer=False).model
    torch.manual_seed(0)
    lora = LoraConfig(r=2, alpha=4, target_modules=["q_proj", "v_proj"])
    inject_lora(model, lora)
    folder = tmp_path_factory.mktemp("adapter") / "a"
    save_peft_adapter(folder, lora_state_dict(model), lora, str(tiny))
    config = json.loads((folder / "adapter_config.json").read_text())
    keys = set(config) | {"r", "lora_alpha", "target_modules", "use_dora", "use_rslora", "peft_type", "task_type",
                          "fan_in_fan_out", "bias", "modules_to_save", "rank_pattern", "alpha_pattern",
                          "layers_to_transform", "init_lora_weights", "lora_dropout", "base_model_name_or_path"}
    tally = fuzz_tally("adapter_config.json")

    @FUZZ
    @given(case=dict_mutations(keys).map(lambda s: json_text(apply(config, s)).encode()) | WHOLE_FILE)
    def run(case):
        (folder / "adapter_config.json").write_bytes(case)
        check(tally, lambda: load_peft_adapter(folder))

    run()
    assert sum(tally.values()) >= CASES and tally["refused"] > 0 and tally["accepted"] > 0


# ----------------------------------------------------------------------------------------------- YAML configs

def test_fuzzed_yaml_training_configs(tmp_path_factory):
    import dataclasses

    import yaml

    from homebake.cli import build_parser
    from homebake.train.config import SECTIONS, TrainConfig, resolve_config

    path = tmp_path_factory.mktemp("yaml") / "run.yaml"
    top = [f.name for f in dataclasses.fields(TrainConfig)]
    section_keys = {name: [f.name for f in dataclasses.fields(cls)] for name, (cls, _) in SECTIONS.items()}
    value = JSON | st.sampled_from(["1e-3", "yes", "off", "~", "[a, b]", "{x: 1}", ".inf", "0x10", "1_000"])
    sections = st.fixed_dictionaries({}, optional={
        name: st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), value, max_size=4) | value
        for name, keys in section_keys.items()})
    mapping = st.builds(lambda a, b: {**a, **b}, st.dictionaries(st.sampled_from(top) | st.text(max_size=8), value,
                                                                max_size=5), sections)

    def dump(obj) -> bytes:
        try:
            return yaml.safe_dump(obj, allow_unicode=True).encode("utf-8", "surrogatepass")
        except (yaml.YAMLError, UnicodeEncodeError):
            return b"{}"

    tally = fuzz_tally("YAML training configs")
    parser = build_parser()

    @FUZZ
    @given(case=mapping.map(dump) | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
           | st.binary(max_size=100))
    def run(case):
        path.write_bytes(case)
        check(tally, lambda: resolve_config(parser.parse_args(["train", str(path)])))

    run()
    assert sum(tally.values()) >= CASES and tally["refused"] > 0 and tally["accepted"] > 0


# ----------------------------------------------------------------------------------------------- dataset lines

MESSAGE_KEYS = ["messages", "conversations", "role", "content", "from", "value", "tools", "system", "instruction",
                "input", "output", "prompt", "completion", "text", "tool_calls", "type", "name", "other"]
RECORD = st.recursive(SCALARS | st.sampled_from(["user", "assistant", "system", "tool", "human", "gpt"]),
                      lambda children: st.lists(children, max_size=4)
                      | st.dictionaries(st.sampled_from(MESSAGE_KEYS), children, max_size=5), max_leaves=20)


def test_fuzzed_dataset_lines(tiny, tmp_path_factory):
    from homebake.data import prepare_dataset
    from homebake.data.config import DataConfig
    from homebake.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_hf_dir(tiny)
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    line = RECORD.map(json_text) | st.text(max_size=60) | st.just(good)
    tally = fuzz_tally("dataset lines")

    @FUZZ
    @given(lines=st.lists(line, min_size=1, max_size=5),
           options=st.fixed_dictionaries({"format": st.sampled_from(["auto", "messages", "sharegpt", "alpaca",
                                                                     "completion", "text"]),
                                          "train_on": st.sampled_from(["all_assistant", "last_turn", "everything"]),
                                          "max_seq_len": st.sampled_from([2, 8, 64, 512]),
                                          "truncation": st.sampled_from(["drop", "truncate"])}))
    def run(lines, options):
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
        config = DataConfig(paths=[str(path)], validation_fraction=0.0, **options)
        check(tally, lambda: prepare_dataset(config, tokenizer))

    run()
    assert sum(tally.values()) >= CASES and tally["accepted"] > 0
