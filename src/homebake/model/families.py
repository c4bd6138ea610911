"""Which module class builds a model: one per structurally different family, chosen by ``model_type``."""

from __future__ import annotations

from .args import ModelArgs
from .decoder import CausalLM
from .gemma import GemmaCausalLM
from .phi3 import Phi3CausalLM

# model_type -> class; every other supported type is the shared Llama-family decoder
FAMILY_CLASSES: dict[str, type[CausalLM]] = {
    "gemma2": GemmaCausalLM,
    "gemma3_text": GemmaCausalLM,
    "phi3": Phi3CausalLM,
}


def causal_lm_class(args: ModelArgs) -> type[CausalLM]:
    return FAMILY_CLASSES.get(args.model_type, CausalLM)


def build_causal_lm(args: ModelArgs) -> CausalLM:
    """The model for ``args`` (random init; under ``torch.device("meta")`` no memory is touched)."""
    return causal_lm_class(args)(args)
