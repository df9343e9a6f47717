"""The CPU LoRA fast path: dropout sampled by geometric gaps (the same distribution as
nn.Dropout) and a fused adapter forward/backward (the same numbers as PEFT's)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from sftrun.config import LoraSettings
from sftrun.fastlora import SPARSE_MAX_P, SparseDropout, dropped_positions
from sftrun.loss import LabelOnlyLoss
from sftrun.modeling import load_lora_model, lora_config, select_backend


def _dropped(n: int, p: float, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    return dropped_positions(n, p)


@pytest.mark.parametrize("p", [0.01, 0.05, 0.1, 0.3])
def test_drop_count_and_neighbours_match_independent_bernoulli_trials(p: float) -> None:
    n = 2_000_000
    pos = _dropped(n, p, seed=11)
    assert bool((pos[1:] > pos[:-1]).all()) and int(pos[0]) >= 0 and int(pos[-1]) < n
    # Binomial(n, p) count: within 5 standard deviations.
    assert abs(len(pos) - n * p) < 5 * math.sqrt(n * p * (1 - p))
    # Independence: a dropped element's neighbour is dropped with probability p, not more or less.
    mask = torch.zeros(n, dtype=torch.bool)
    mask[pos] = True
    pairs = int((mask[1:] & mask[:-1]).sum())
    expected = (n - 1) * p * p
    assert abs(pairs - expected) < 5 * math.sqrt(expected * (1 - p * p))
    # Uniform over the tensor: each tenth holds a tenth of the drops.
    tenths = torch.bincount(pos * 10 // n, minlength=10).float()
    assert float((tenths - n * p / 10).abs().max()) < 5 * math.sqrt(n * p / 10)


def test_positions_are_a_function_of_the_rng_state() -> None:
    assert torch.equal(_dropped(10_000, 0.05, seed=3), _dropped(10_000, 0.05, seed=3))
    assert not torch.equal(_dropped(10_000, 0.05, seed=3), _dropped(10_000, 0.05, seed=4))


@pytest.mark.parametrize("n,p", [(1, 0.05), (7, 0.001), (50_000, 1e-6), (5, 0.29)])
def test_tiny_tensors_and_tiny_probabilities(n: int, p: float) -> None:
    for seed in range(20):
        pos = _dropped(n, p, seed)
        assert len(pos) == len(set(pos.tolist())) <= n
        assert all(0 <= i < n for i in pos.tolist())


def test_forward_and_backward_equal_an_explicit_mask() -> None:
    p = 0.2
    drop = SparseDropout(p).train()
    base = torch.randn(6, 9, 13)
    x = base.transpose(0, 1).requires_grad_()  # not contiguous: positions are in logical order
    torch.manual_seed(5)
    y = drop(x)
    torch.manual_seed(5)
    keep = torch.ones(x.numel())
    keep[dropped_positions(x.numel(), p)] = 0.0
    keep = keep.view(x.shape)
    assert torch.equal(y, x * (1 / (1 - p)) * keep)  # scaled as nn.Dropout scales
    assert 0 < int((y == 0).sum()) < x.numel()
    grad = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, x, grad)
    assert torch.equal(got, grad * (1 / (1 - p)) * keep)


def test_eval_mode_and_zero_p_are_the_identity() -> None:
    x = torch.randn(4, 8)
    assert SparseDropout(0.1).eval()(x) is x
    assert SparseDropout(0.0).train()(x) is x
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        SparseDropout(1.0)


def test_large_p_falls_back_to_torch_dropout() -> None:
    p = min(0.9, SPARSE_MAX_P + 0.2)
    x = torch.ones(200_000)
    torch.manual_seed(0)
    y = SparseDropout(p).train()(x)
    torch.manual_seed(0)
    assert torch.equal(y, nn.functional.dropout(x, p, training=True))


def _fast_and_stock(tiny_model: Path, lora: LoraSettings) -> tuple[nn.Module, nn.Module]:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    fast = load_lora_model(tiny_model, lora, select_backend("plain", True), torch.float32, 64)
    stock = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model), lora_config(lora, str(tiny_model))
    )
    stock.load_state_dict(fast.state_dict())
    for model in (fast, stock):  # LoRA B starts at zero; make the adapters matter
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data = torch.linspace(-0.5, 0.5, param.numel()).view(param.shape)
    return fast, stock


def test_fast_lora_layers_have_sparse_dropout_and_the_same_adapter_keys(tiny_model: Path) -> None:
    from peft import get_peft_model_state_dict

    lora = LoraSettings(r=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj", "o_proj"])
    fast, stock = _fast_and_stock(tiny_model, lora)
    dropouts = [m for m in fast.modules() if isinstance(m, SparseDropout)]
    lora_layers = [m for m in fast.modules() if hasattr(m, "lora_A")]
    assert len(dropouts) == len(lora_layers) == 3 * fast.config.num_hidden_layers
    assert {d.p for d in dropouts} == {0.1}
    assert set(get_peft_model_state_dict(fast)) == set(get_peft_model_state_dict(stock))


def test_fused_forward_and_backward_equal_peft_with_the_same_mask(tiny_model: Path) -> None:
    p = 0.2
    lora = LoraSettings(r=4, alpha=8, dropout=p, target_modules=["q_proj"])
    fast, stock = _fast_and_stock(tiny_model, lora)
    layer = fast.base_model.model.model.layers[0].self_attn.q_proj
    ref = stock.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    keep = torch.ones(x.numel())
    keep[dropped_positions(x.numel(), p)] = 0.0
    ref.lora_dropout["default"] = _Mask(keep.view(x.shape) / (1 - p))
    y_ref = ref(x_ref)
    assert torch.allclose(y, y_ref, atol=1e-6) and not torch.equal(y, ref.base_layer(x_ref))
    grad = torch.randn_like(y)
    fast_grads = torch.autograd.grad(
        y, [x, layer.lora_A["default"].weight, layer.lora_B["default"].weight], grad
    )
    ref_grads = torch.autograd.grad(
        y_ref, [x_ref, ref.lora_A["default"].weight, ref.lora_B["default"].weight], grad
    )
    for got, want in zip(fast_grads, ref_grads, strict=True):
        assert torch.allclose(got, want, atol=1e-6)


class _Mask(nn.Module):
    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.keep = keep

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.keep


def test_whole_model_loss_and_gradients_equal_peft_without_dropout(tiny_model: Path) -> None:
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    fast, stock = _fast_and_stock(tiny_model, lora)
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :5] = -100
    results = []
    for model in (fast, stock):
        model.train()
        loss, _ = LabelOnlyLoss(model)(ids, torch.ones_like(ids), labels)
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    (fast_loss, fast_grads), (stock_loss, stock_grads) = results
    assert torch.allclose(fast_loss, stock_loss, rtol=1e-6)
    assert fast_grads.keys() == stock_grads.keys() and len(fast_grads) == 7 * 2 * 2
    for name, grad in fast_grads.items():
        assert torch.allclose(grad, stock_grads[name], rtol=1e-4, atol=1e-6), name


def test_eval_and_disabled_adapters_take_peft_own_path(tiny_model: Path) -> None:
    lora = LoraSettings(r=4, alpha=8, dropout=0.1)
    fast, stock = _fast_and_stock(tiny_model, lora)
    ids = torch.randint(3, 300, (1, 9), generator=torch.Generator().manual_seed(2))
    fast.eval()
    stock.eval()
    with torch.no_grad():
        assert torch.equal(fast(input_ids=ids).logits, stock(input_ids=ids).logits)
        with fast.disable_adapter(), stock.disable_adapter():
            assert torch.equal(fast(input_ids=ids).logits, stock(input_ids=ids).logits)
