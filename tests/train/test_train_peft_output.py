"""The adapter `homebake train` writes loads in PEFT onto the transformers model with homebake's logits."""

import pytest
import torch

from train_helpers import tiny_config
from homebake.train import loop


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_trained_adapter_loads_in_peft_with_identical_logits(tiny_model_dir, tiny_data, tmp_path, method):
    peft = pytest.importorskip("peft")
    from homebake.adapters.lora import inject_lora, load_lora_state_dict
    from homebake.adapters.peft import load_peft_adapter
    from homebake.model.load import load_model
    from tiny_models import load_hf_reference

    out = tmp_path / "run"
    loop.train(tiny_config(tiny_model_dir, tiny_data, out, method=method, max_steps=3, learning_rate=1e-2,
                           lora={"target_modules": "all-linear", "use_rslora": method == "dora"}))

    reference = peft.PeftModel.from_pretrained(load_hf_reference(tiny_model_dir), str(out)).eval()
    adapter_state, lora_config = load_peft_adapter(out)
    assert any(t.abs().max() > 0 for k, t in adapter_state.items() if "lora_B" in k), "training moved B"
    ours = load_model(str(tiny_model_dir)).model
    inject_lora(ours, lora_config)
    load_lora_state_dict(ours, adapter_state)
    ours.eval()

    ids = torch.randint(0, 256, (2, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        actual = ours.logits(ours(ids))
        base = load_hf_reference(tiny_model_dir)(input_ids=ids).logits
    assert (expected - base).abs().max() > 1e-3  # the adapter changes the output, so the test can fail
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)
