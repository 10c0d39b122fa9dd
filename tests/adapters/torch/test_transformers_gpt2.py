"""Hugging Face GPT-2 from a tiny config (no download) with SDPA attention: auto routes around flash kernels."""

import math
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from eos_core import CDAT  # noqa: E402
from eos_core.adapters.torch import CurvatureTuner  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_auto_route_with_sdpa_attention(dtype):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                                     attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                     bos_token_id=0, eos_token_id=0)
    config._attn_implementation = "sdpa"
    model = transformers.GPT2LMHeadModel(config).to(dtype)
    ids = torch.randint(0, 64, (4, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tuner = CurvatureTuner(optimizer, CDAT(scale=2.0, ema=0.9), sharpness_every=2)

    def closure():
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = []
        for _ in range(5):  # steps 0..4: sharpness is tracked at steps 0, 2 and 4
            tuner.step(closure)
            losses.append(tuner.diagnostics["loss"])
    assert tuner.diagnostics["route"] == "double-backward+sdpa-math"
    assert any("fell back" in str(w.message) for w in caught)
    assert math.isfinite(tuner.diagnostics["lr"]) and tuner.diagnostics["lr"] > 0
    assert math.isfinite(tuner.diagnostics["sharpness"])
    assert losses[-1] < losses[0]
