"""Fuzzed GGUF files: mutations of a real header (its counts, string lengths, dimensions, types and offsets, set to
boundary values), random byte flips and truncations. Reading and loading either works or raises a HomebakeError,
and never allocates more than the file justifies: a header declaring a 2^40-element tensor is refused up front."""

from __future__ import annotations

import struct
import tracemalloc

import gguf
import numpy as np
import pytest
from conftest import fuzz_tally
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homebake.errors import HomebakeError, ModelLoadError
from homebake.model.gguf_file import read_gguf
from homebake.model.load import load_model

BOUNDARY = [0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 24, 31, 32, 33, 64, 255, 256, 4096, 2**16, 2**31 - 1, 2**31, 2**32 - 1,
            2**32, 2**40, 2**48, 2**62, 2**63, 2**64 - 1]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A tiny llama GGUF (Q8_0 matrices, F32 norms) with a byte-level tokenizer and chat template, and the offset
    and width of every integer field in its header (lengths, counts, dims, types, offsets)."""
    from tiny_models import save_byte_tokenizer, save_tiny_hf_model

    from homebake.export.gguf import tokenizer_gguf_metadata
    from homebake.export.gguf_writer import write_gguf

    folder = tmp_path_factory.mktemp("tiny-gguf")
    save_tiny_hf_model(folder, "llama", seed=0)
    save_byte_tokenizer(folder, merges=[("a", "b"), ("ab", "c")])  # gguf cannot write an empty merges array
    loaded = load_model(folder)
    path = write_gguf(folder / "tiny.gguf", loaded.model.state_dict(), loaded.args, tensor_type="Q8_0",
                      tokenizer_metadata=tokenizer_gguf_metadata(loaded.tokenizer))
    reader = gguf.GGUFReader(path)
    base = reader.data.__array_interface__["data"][0]
    fields = []
    parts = [p for f in reader.fields.values() for p in f.parts] + [p for t in reader.tensors for p in t.field.parts]
    for part in parts:
        if part.dtype.kind == "u" and part.dtype.itemsize in (4, 8) and part.size == 1:
            fields.append((part.__array_interface__["data"][0] - base, part.dtype.itemsize))
    data = path.read_bytes()
    return data, sorted(set(fields)), reader.data_offset


def mutations(pristine):
    data, fields, header_end = pristine
    set_field = st.tuples(st.just("field"), st.sampled_from(fields),
                          st.sampled_from(BOUNDARY) | st.integers(-3, 3) | st.integers(0, 2**64 - 1))
    flip = st.tuples(st.just("byte"), st.integers(0, header_end - 1) | st.integers(0, len(data) - 1),
                     st.integers(0, 255))
    cut = st.tuples(st.just("truncate"), st.integers(0, len(data) - 1), st.just(0))
    return st.lists(st.one_of(set_field, set_field, flip, cut), min_size=1, max_size=3)


def mutate(data: bytes, steps) -> bytes:
    buffer = bytearray(data)
    for kind, where, value in steps:
        if kind == "field":
            offset, width = where
            if offset + width > len(buffer):
                continue
            fmt = "<I" if width == 4 else "<Q"
            if -3 <= value <= 3:  # a small change of the real value
                value = struct.unpack_from(fmt, buffer, offset)[0] + value
            struct.pack_into(fmt, buffer, offset, value % (1 << (8 * width)))
        elif kind == "byte" and where < len(buffer):
            buffer[where] = value
        elif kind == "truncate":
            del buffer[where:]
    return bytes(buffer)


@pytest.mark.slow  # ~40 s on 2 busy cores
def test_fuzzed_gguf_is_read_or_refused_with_a_homebake_error(pristine, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "m.gguf"
    tally = fuzz_tally("GGUF reader (mutated real headers)")

    @settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
    @given(steps=mutations(pristine))
    def run(steps):
        data = mutate(pristine[0], steps)
        path.write_bytes(data)
        tracemalloc.start()
        try:  # read_gguf, then metadata values and tensor shapes through ModelArgs, the decoder and the tokenizer
            load_model(path)
            tally["loaded"] += 1
        except HomebakeError as error:
            assert "\n" not in str(error)
            tally["refused"] += 1
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        # float32 copies of the (Q8_0/F32) tensors and the parsed metadata; never what a header merely declares
        assert peak < 16 * len(pristine[0]) + (8 << 20), f"{peak} bytes allocated for a {len(data)}-byte file"

    run()
    assert sum(tally.values()) >= 2000 and tally["refused"] > 0


def test_a_header_declaring_a_2_to_the_40_element_tensor_is_refused_before_allocating(pristine, tmp_path):
    data, fields, header_end = pristine
    path = tmp_path / "huge.gguf"
    path.write_bytes(data)
    reader = gguf.GGUFReader(path)
    tensor = reader.tensors[0]
    dims = tensor.field.parts[3]  # the dimension array of the first tensor
    offset = dims.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]
    del reader
    buffer = bytearray(data)
    struct.pack_into("<Q", buffer, offset + 8 * (len(dims) - 1), 2**40 // int(np.prod(dims[:-1])))
    path.write_bytes(bytes(buffer))
    tracemalloc.start()
    with pytest.raises(ModelLoadError) as info:
        read_gguf(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "declares 1099511627776 elements" in str(info.value) and tensor.name in str(info.value)
    assert peak < 4 << 20


def test_an_array_count_past_the_end_is_refused_not_looped_over(pristine, tmp_path):
    data = bytearray(pristine[0])
    reader = gguf.GGUFReader(_write(tmp_path / "a.gguf", bytes(data)))
    field = reader.fields["tokenizer.ggml.token_type"]  # an int32 array: gguf's reader would loop 2^60 times
    count = field.parts[4]
    offset = count.__array_interface__["data"][0] - reader.data.__array_interface__["data"][0]
    del reader
    struct.pack_into("<Q", data, offset, 2**60)
    with pytest.raises(ModelLoadError, match="token_type"):
        read_gguf(_write(tmp_path / "b.gguf", bytes(data)))


def _write(path, data):
    path.write_bytes(data)
    return path
