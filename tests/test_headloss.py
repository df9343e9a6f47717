"""The LM head's cross-entropy with its gradient computed in the forward (sftrun.headloss):
the same loss and row gradients as stock ``F.cross_entropy``, and the stock path wherever the
shortcut would not give them."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sftrun.headloss import fused_applies, head_cross_entropy


def _head(vocab: int, hidden: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(hidden, vocab, bias=False)
    head.weight.requires_grad_(False)
    return head


def _stock(rows: torch.Tensor, head: nn.Linear, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(head(rows), targets, reduction="sum")


# A vocabulary that is not a multiple of the block, one smaller than a block, and rows at scale
# (logits of 30: a naive exp would overflow nothing here, but the running maximum must rescale).
@pytest.mark.parametrize(
    ("vocab", "rows", "scale"), [(2500, 37, 1.0), (300, 5, 1.0), (2049, 9, 30.0)]
)
def test_loss_and_row_gradients_equal_stock_cross_entropy(
    vocab: int, rows: int, scale: float
) -> None:
    head = _head(vocab, 64)
    base = torch.randn(rows, 64, generator=torch.Generator().manual_seed(1)) * scale
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(2))
    results = []
    for fn in (head_cross_entropy, _stock):
        x = base.clone().requires_grad_()
        loss = fn(x, head, targets)
        (loss * 0.37).backward()  # the upstream factor reaches the saved gradient
        results.append((loss.detach(), x.grad))
    assert fused_applies(base.clone().requires_grad_(), head)
    (loss, grad), (want_loss, want_grad) = results
    assert torch.allclose(loss, want_loss, rtol=1e-6)
    assert torch.allclose(grad, want_grad, rtol=1e-5, atol=1e-7)


def test_loss_is_finite_when_one_block_holds_every_large_logit() -> None:
    head = _head(3000, 16)
    with torch.no_grad():
        head.weight[2500:] *= 200.0  # the last block's logits dwarf the others'
    x = torch.randn(4, 16).requires_grad_()
    targets = torch.tensor([0, 2600, 1500, 2999])
    loss = head_cross_entropy(x, head, targets)
    loss.backward()
    want = _stock(x.detach(), head, targets)
    assert torch.isfinite(loss) and torch.allclose(loss, want, rtol=1e-6)
    assert x.grad is not None and bool(torch.isfinite(x.grad).all())


def test_other_cases_keep_the_stock_path() -> None:
    head = _head(300, 16)
    rows = torch.randn(3, 16, requires_grad=True)
    assert fused_applies(rows, head)
    with torch.no_grad():
        assert not fused_applies(rows, head)  # evaluation: no gradient to compute
    assert not fused_applies(rows.detach(), head)
    assert not fused_applies(rows[:0], head)  # no labelled row in the micro-batch
    assert not fused_applies(rows.double(), head)
    trainable = _head(300, 16)
    trainable.weight.requires_grad_(True)
    assert not fused_applies(rows, trainable)  # a trained head needs its own gradient
    biased = nn.Linear(16, 300)
    biased.requires_grad_(False)
    assert not fused_applies(rows, biased)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_applies(rows, head)
    # A trained head gets stock cross-entropy, and its gradient.
    loss = head_cross_entropy(rows, trainable, torch.tensor([1, 2, 3]))
    assert type(loss.grad_fn).__name__ == "NllLossBackward0"
    loss.backward()
    assert trainable.weight.grad is not None
    fused = head_cross_entropy(rows, head, torch.tensor([1, 2, 3]))
    assert type(fused.grad_fn).__name__ == "_HeadCrossEntropyBackward"
