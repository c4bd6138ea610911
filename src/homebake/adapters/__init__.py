"""Adapters: LoRA / DoRA wrappers injected by module path, a pure merge, and NF4 (QLoRA) base storage."""

from .config import LoraConfig
from .lora import (LoraLinear, describe_parameters, inject_lora, load_lora_state_dict, lora_state_dict,
                   merge_lora, quantize_base_to_nf4)
from .nf4 import NF4Linear, NF4Weight

__all__ = ["LoraConfig", "LoraLinear", "NF4Linear", "NF4Weight", "describe_parameters", "inject_lora",
           "load_lora_state_dict", "lora_state_dict", "merge_lora", "quantize_base_to_nf4"]
