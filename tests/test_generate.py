import torch

from homebake.generate import SamplingConfig, sample_next, stream_text


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample_next(logits, SamplingConfig(temperature=0), None) == 1


def test_top_k_one_is_greedy_whatever_the_seed():
    logits = torch.randn(50)
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        assert sample_next(logits, SamplingConfig(temperature=1.5, top_k=1, top_p=1.0), gen) == int(logits.argmax())


def test_top_p_keeps_only_the_nucleus():
    # token 0 holds ~88% of the mass: with top_p 0.5 nothing else may ever be drawn
    logits = torch.tensor([4.0, 2.0, 0.0, 0.0])
    gen = torch.Generator().manual_seed(0)
    picks = {sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.5), gen) for _ in range(200)}
    assert picks == {0}


def test_sampling_follows_the_distribution_and_the_seed():
    logits = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    config = SamplingConfig(temperature=1.0, top_p=1.0)
    gen = torch.Generator().manual_seed(1)
    draws = [sample_next(logits, config, gen) for _ in range(4000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert all(abs(f - p) < 0.03 for f, p in zip(freq, [0.5, 0.3, 0.2]))
    again = torch.Generator().manual_seed(1)
    assert [sample_next(logits, config, again) for _ in range(50)] == draws[:50]


class _ByteTokenizer:
    """Each id is one UTF-8 byte: the harshest case for streaming multi-byte characters."""

    def decode(self, ids):
        return bytes(ids).decode("utf-8", errors="replace")


def test_stream_text_never_emits_half_a_character():
    text = "héllo 👋🏽 世界"
    pieces = list(stream_text(_ByteTokenizer(), list(text.encode())))
    assert "".join(pieces) == text
    assert not any("\ufffd" in piece for piece in pieces)
