"""Sign consensus (TIES "elect sign" and "disjoint merge" masks)."""

from __future__ import annotations

from typing import Literal

import torch

ConsensusMethod = Literal["sum", "count"]


def sign_agreement_mask(
    deltas: torch.Tensor, method: ConsensusMethod = "sum", int8: bool = False
) -> torch.Tensor:
    """Elect a sign per entry and mark which models agree with it.

    deltas: [n_models, *shape] (already weighted). Returns a mask of the same shape,
    True (or 1 as int8) where a model's entry is non-zero and has the elected sign.
    """
    mask_dtype = torch.int8 if int8 else deltas.dtype
    signs = deltas.sign().to(mask_dtype)
    if method == "sum":
        elected = (deltas.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    elif method == "count":
        elected = (signs.sum(dim=0) >= 0).to(mask_dtype) * 2 - 1
    else:
        raise ValueError(f"unknown consensus method {method!r}: expected 'sum' or 'count'")
    return signs == elected
