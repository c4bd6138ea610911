"""llama.cpp (via llama-cpp-python, the optional `llamacpp` test extra) runs our GGUF exports.

Skipped unless llama_cpp is importable. llama.cpp quantises activations in quantised matmuls, so
logits are compared with a tolerance and top-1 agreement over many positions, not exactly.
"""

import pytest
import torch

from homebake.model.load import load_model

from .conftest import logits_of

llama_cpp = pytest.importorskip("llama_cpp")

TEXT = ("The capital of France is Paris. The capital of Italy is Rome. Water boils at one hundred degrees "
        "Celsius. A week has seven days and a year has twelve months.")


@pytest.fixture(scope="module")
def exports(default_gguf, tmp_path_factory):
    from homebake.cli import main

    out = tmp_path_factory.mktemp("llamacpp")
    paths = {}
    for quant in ("F16", "Q8_0"):
        assert main(["export", str(default_gguf), "--format", "gguf", "--quant", quant, "--out", str(out / quant)]) == 0
        (paths[quant],) = (out / quant).glob("*.gguf")
    return paths


@pytest.mark.default_model
@pytest.mark.slow
@pytest.mark.parametrize("quant", ["F16", "Q8_0"])
def test_llama_cpp_logits_match_homebake(quant, exports, default_gguf):
    ours = load_model(str(exports[quant]))
    ids = ours.tokenizer.encode(TEXT)
    expected = logits_of(ours.model, ids)
    llm = llama_cpp.Llama(model_path=str(exports[quant]), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    got = torch.tensor(llm.scores[: len(ids)], dtype=torch.float32)
    agreement = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    scale = expected.abs().max().item()
    assert agreement > 0.9, agreement
    assert (got - expected).abs().mean().item() < 0.02 * scale


@pytest.mark.default_model
@pytest.mark.slow
def test_llama_cpp_chat_stops_at_end_token(exports):
    llm = llama_cpp.Llama(model_path=str(exports["Q8_0"]), n_ctx=512, verbose=False, n_threads=2)
    # llama.cpp quantises activations, so on some prompts this 4-bit 135M model drifts into a loop even from
    # the source GGUF (e.g. "What is the capital of France?"); "Say hello." answers briefly in both, so a
    # failure here means the end token or template metadata is wrong, not the model's luck.
    reply = llm.create_chat_completion(messages=[{"role": "user", "content": "Say hello."}],
                                       max_tokens=128, temperature=0.0)
    choice = reply["choices"][0]
    assert choice["finish_reason"] == "stop"  # the end token ended it, not max_tokens
    assert "<|im_end|>" not in choice["message"]["content"]
