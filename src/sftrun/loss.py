"""The training objective: cross-entropy summed over label tokens only, so the loop can
normalise by the label tokens of the whole optimizer step (every token weighs the same,
whatever micro-batch or process it landed in).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from sftrun import constants as C
from sftrun.headloss import head_cross_entropy


class LabelOnlyLoss(nn.Module):
    """Sum of next-token cross-entropy over labelled positions, and their count.

    Runs the decoder over every position but the LM head only where a label exists: in chat
    SFT most tokens are prompt tokens, so this skips most of the vocabulary projection and
    never materialises full-vocabulary logits; on the CPU the head's cross-entropy computes its
    gradient in the forward (:mod:`sftrun.headloss`). Wrapping the PEFT model in a module (rather
    than calling its parts from the loop) keeps DDP's gradient hooks in the forward path.
    """

    def __init__(self, peft_model: Any) -> None:
        super().__init__()
        self.peft_model = peft_model

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        base = self.peft_model.get_base_model()
        # No KV cache: training never reuses it, and building one costs memory.
        hidden = base.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        mask = targets != C.IGNORE_INDEX
        rows, head = hidden[:, :-1][mask], base.get_output_embeddings()
        cap = getattr(base.config, "final_logit_softcapping", None)
        if cap:  # Gemma 2/3 squash the logits after the head (their forward does it there)
            logits = torch.tanh(head(rows) / cap) * cap
            loss_sum = nn.functional.cross_entropy(logits.float(), targets[mask], reduction="sum")
        else:
            loss_sum = head_cross_entropy(rows, head, targets[mask])
        return loss_sum, mask.sum()
