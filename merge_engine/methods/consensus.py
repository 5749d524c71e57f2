"""Sign consensus (TIES "elect sign" and "disjoint merge" masks)."""

from __future__ import annotations

import torch


def sign_agreement_mask(deltas: torch.Tensor, int8: bool = False) -> torch.Tensor:
    """Elect a sign per entry by summed mass (TIES) and mark which models agree with it.

    deltas: [n_models, *shape] (already weighted). Returns a bool mask of the same
    shape, True where a model's entry is non-zero and has the elected sign (a sum of
    exactly 0 elects +). ``int8`` keeps the sign scratch as int8 instead of deltas'
    dtype (memory only, as mergekit's ``int8_mask``).
    """
    scratch = torch.int8 if int8 else deltas.dtype
    elected = (deltas.sum(dim=0) >= 0).to(scratch) * 2 - 1  # elect sign: [*shape]
    return deltas.sign().to(scratch) == elected  # disjoint: [n, *shape]
