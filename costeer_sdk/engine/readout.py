"""Next-token scores read out of a forward pass: every logit, or only those asked for.

A causal LM's last layer projects the final hidden state onto the whole vocabulary. For
the 0.5B local model that projection (151,936 x 896) is about a quarter of a decoding
step's compute. CoSteer over the cloud's top-k needs the local logits of those k tokens
alone, and the per-row constants of log-softmax cancel in the fusion, so a step can stop
at the hidden state and project onto the k tokens once the cloud's answer names them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel

__all__ = ["NextTokenScores", "output_head"]


@dataclass(frozen=True)
class NextTokenScores:
    """The next-token scores of a sequence group's rows.

    Holds either ``logits`` (``[rows, vocab]``, float32) or the rows' last ``hidden``
    states with the model's output layer ``head``, from which `at` projects the few
    logits wanted (in float32, however the model computes)."""

    logits: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    head: torch.nn.Linear | None = None

    def __post_init__(self) -> None:
        if (self.logits is None) == (self.hidden is None or self.head is None):
            raise ValueError("give either logits, or hidden states with their head")

    @property
    def width(self) -> int:
        """Size of the vocabulary the scores range over."""
        if self.logits is not None:
            return int(self.logits.shape[-1])
        assert self.head is not None
        return int(self.head.weight.shape[0])

    def full(self) -> torch.Tensor:
        """Logits of every token, ``[rows, vocab]``."""
        if self.logits is not None:
            return self.logits
        assert self.hidden is not None and self.head is not None
        with torch.inference_mode():
            return self.head(self.hidden).float()

    def at(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Logits of ``token_ids`` (``[k]``) for every row, ``[rows, k]``."""
        if self.logits is not None:
            return self.logits[:, token_ids]
        assert self.hidden is not None and self.head is not None
        bias = self.head.bias
        with torch.inference_mode():  # the weights are parameters; no autograd here
            return F.linear(
                self.hidden.float(),
                self.head.weight[token_ids].float(),
                None if bias is None else bias[token_ids].float(),
            )


def output_head(model: PreTrainedModel) -> tuple[torch.nn.Module, torch.nn.Linear] | None:
    """The model's decoder stack and output layer, when its logits are exactly the
    layer applied to the decoder's last hidden state; None for a model that does
    more (logit soft-capping or scaling), or whose parts cannot be found. Checked by
    running both on a few tokens."""
    try:
        decoder = model.get_decoder()
        head = model.get_output_embeddings()
        if not isinstance(head, torch.nn.Linear) or decoder is model:
            return None
        ids = torch.arange(3, device=model.device)[None] % int(head.weight.shape[0])
        with torch.inference_mode():
            expected = model(input_ids=ids, use_cache=False).logits[:, -1].float()
            hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state[:, -1]
            got = head(hidden).float()
    except (AttributeError, NotImplementedError, TypeError, ValueError):
        return None
    return (decoder, head) if torch.allclose(got, expected, rtol=1e-4, atol=1e-4) else None
