"""Embeddings for tokens the model has never seen, from the tokens it shares with the donor.

Each method is a pure function on tensors (mergekit 0.1.5's tokensurgeon semantics):

* ``omp``: orthogonal matching pursuit. In the donor's embedding space, pick the ``k`` shared tokens
  that best explain the new token's donor row (greedy, each step re-fitting all coefficients by least
  squares), then apply the same coefficients to those tokens' rows in the model. Tokens are assumed to
  sit in the two spaces in the same relative arrangement (Goddard and Fernandes Neto, "Training-Free
  Tokenizer Transplantation via Orthogonal Matching Pursuit", arXiv:2506.06607).
* ``common_interpolation``: the ``k`` nearest shared tokens in the donor space (euclidean or cosine),
  weighted by inverse distance, barycentric or least-squares weights; same transfer.
* ``mean``: the mean of all the model's rows. ``zero``: zeros.
* ``randn``: standard normal rows. ``john_hewitt``: samples from a normal with the mean and covariance
  of the model's rows (Hewitt, "Initializing New Word Embeddings for Pretrained Language Models", 2021).

Shapes: targets [B, D_donor], shared donor rows [N, D_donor], shared model rows [N, D_model];
results [B, D_model]. Arithmetic is float32 (float64 kept), results in the model's dtype.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch


class Method(str, enum.Enum):
    OMP = "omp"
    COMMON_INTERPOLATION = "common_interpolation"
    MEAN = "mean"
    ZERO = "zero"
    RANDN = "randn"
    JOHN_HEWITT = "john_hewitt"


# mergekit's other methods, refused with this reason
UNSUPPORTED = {
    "subword": "it needs the model's own tokenization of each new token",
    "landmark_pca": "not implemented in evomerge",
    "stb": "not implemented in evomerge",
    "mp_rope": "not implemented in evomerge",
}
SHARED_BASIS = (Method.OMP, Method.COMMON_INTERPOLATION)  # methods that read the shared tokens
WEIGHT_SCHEMES = ("distance_proportional", "barycentric", "least_squares")


@dataclass(frozen=True)
class Approximation:
    """How new rows are computed (the command's -a, -k, -c, -w, -nvn, -nvs)."""

    method: Method = Method.OMP
    k: int = 64
    cosine_similarity: bool = False
    weight_scheme: str = "distance_proportional"
    new_vocab_noise: float | None = None
    new_vocab_scale: float | None = None


def _work(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.to(torch.float32)


def batch_omp(targets: torch.Tensor, points: torch.Tensor, k: int, eps: float = 1e-8,
              reorthogonalize_interval: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal matching pursuit for each target: (indices [B, k] into points, coefficients [B, k]) with
    targets ~= sum_j coeff[:, j] * points[indices[:, j]]. The selected atoms are kept as an incremental QR
    factorisation (Gram-Schmidt), re-orthogonalised every `reorthogonalize_interval` steps."""
    b, d = targets.shape
    n = points.shape[0]
    if k > n:
        raise ValueError(f"cannot select {k} atoms from {n} candidates")
    y, x = _work(targets), _work(points).to(_work(targets).dtype)
    q = y.new_zeros((b, d, k))  # orthonormal basis of the selected atoms, per target
    r = y.new_zeros((b, k, k))  # atoms = q @ r
    selected = torch.zeros((b, k), dtype=torch.long, device=y.device)
    taken = torch.zeros((b, n), dtype=torch.bool, device=y.device)
    rows = torch.arange(b, device=y.device)
    residual = y.clone()
    for t in range(k):
        # select: the unused atom most correlated with the residual
        corr = (residual @ x.T).abs().masked_fill_(taken, -float("inf"))  # [B, N]
        new = corr.argmax(dim=1)
        selected[:, t] = new
        taken[rows, new] = True
        atom = x[new]  # [B, D]
        # extend the QR factorisation with the new atom
        if t == 0:
            r[:, 0, 0] = atom.norm(dim=1)
            q[:, :, 0] = atom / r[:, 0, 0].clamp(min=eps).unsqueeze(1)
        else:
            proj = torch.bmm(q[:, :, :t].transpose(1, 2), atom.unsqueeze(-1)).squeeze(-1)  # [B, t]
            rest = atom - torch.bmm(q[:, :, :t], proj.unsqueeze(-1)).squeeze(-1)
            norm = rest.norm(dim=1).clamp(min=eps)
            r[:, :t, t] = proj
            r[:, t, t] = norm
            q[:, :, t] = rest / norm.unsqueeze(-1)
        if t > 0 and t % reorthogonalize_interval == 0:
            q_new, r_new = torch.linalg.qr(q[:, :, : t + 1], mode="reduced")
            r[:, : t + 1, : t + 1] = torch.bmm(r_new, r[:, : t + 1, : t + 1])
            q[:, :, : t + 1] = q_new
        # least-squares fit on the selected atoms: project the targets on their span
        qt_y = torch.bmm(q[:, :, : t + 1].transpose(1, 2), y.unsqueeze(-1))  # [B, t+1, 1]
        residual = y - torch.bmm(q[:, :, : t + 1], qt_y).squeeze(-1)
    coeff = torch.linalg.solve_triangular(r, torch.bmm(q.transpose(1, 2), y.unsqueeze(-1)), upper=True)
    return selected, coeff.squeeze(-1)


def common_interpolation(targets: torch.Tensor, points: torch.Tensor, k: int, cosine: bool = False,
                         scheme: str = "distance_proportional") -> tuple[torch.Tensor, torch.Tensor]:
    """The k nearest points of each target and their weights: (indices [B, k], weights [B, k])."""
    y, x = _work(targets), _work(points)
    if cosine:
        sim = (y @ x.T) / (y.norm(dim=1, keepdim=True) * x.norm(dim=1, keepdim=True).T).clamp(min=1e-6)
        dist = 1 - sim
    else:
        dist = torch.cdist(y, x, p=2)
    near, idx = torch.topk(dist, k=k, dim=1, largest=False)  # [B, k]
    pts = x[idx]  # [B, k, D]
    if scheme == "distance_proportional":
        w = (1 - near) if cosine else 1 / near.clamp_min(1e-6)
        w = w / w.sum(dim=1, keepdim=True).clamp_min(1e-6)
    elif scheme == "barycentric":  # least squares with the weights summing to one (a Lagrange multiplier)
        bsz = y.shape[0]
        gram = torch.bmm(pts, pts.transpose(1, 2))
        ones = gram.new_ones((bsz, k, 1))
        top = torch.cat([gram, ones], dim=2)
        bottom = torch.cat([ones.transpose(1, 2), gram.new_zeros((bsz, 1, 1))], dim=2)
        rhs = torch.cat([torch.bmm(y.unsqueeze(1), pts.transpose(1, 2)).squeeze(1), gram.new_ones((bsz, 1))], dim=1)
        w = torch.linalg.lstsq(torch.cat([top, bottom], dim=1), rhs.unsqueeze(-1)).solution.squeeze(-1)[..., :k]
    elif scheme == "least_squares":
        w = torch.linalg.lstsq(pts.transpose(1, 2), y.unsqueeze(-1)).solution.squeeze(-1)
    else:
        raise ValueError(f"unknown weight scheme {scheme!r}: expected one of {', '.join(WEIGHT_SCHEMES)}")
    return idx, w


def john_hewitt(model_rows: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """`count` samples of N(mean, covariance) of the model's rows; 0.02 * N(0, 1) when the covariance is
    not positive definite (as mergekit)."""
    x = _work(model_rows)
    mean = x.mean(dim=0)
    centered = x - mean
    cov = centered.T @ centered / x.shape[0]
    chol, info = torch.linalg.cholesky_ex(cov)
    z = torch.randn((count, x.shape[1]), generator=generator, dtype=x.dtype, device="cpu").to(x.device)
    if int(info) != 0:
        return z * 0.02
    return mean + z @ chol.T


def approximate(method: Approximation, targets: torch.Tensor, donor_shared: torch.Tensor,
                model_shared: torch.Tensor, model_rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """New rows [B, D_model] for the donor rows `targets` [B, D_donor]; `donor_shared` [N, D_donor] and
    `model_shared` [N, D_model] are the rows of the shared tokens, `model_rows` all the model's rows."""
    count, width = targets.shape[0], model_rows.shape[1]
    m = method.method
    if m == Method.MEAN:
        out = _work(model_rows).mean(dim=0).expand(count, width)
    elif m == Method.ZERO:
        out = model_rows.new_zeros((count, width))
    elif m == Method.RANDN:
        out = torch.randn((count, width), generator=generator, dtype=torch.float32)
    elif m == Method.JOHN_HEWITT:
        out = john_hewitt(model_rows, count, generator)
    else:
        if m == Method.OMP:
            idx, coeff = batch_omp(targets, donor_shared, method.k)
        else:
            idx, coeff = common_interpolation(targets, donor_shared, method.k, method.cosine_similarity,
                                              method.weight_scheme)
        # transfer: the same combination of the same tokens, in the model's space
        out = torch.bmm(coeff.unsqueeze(1).float(), model_shared[idx].float()).squeeze(1)
    out = out.to(model_rows.device)
    if method.new_vocab_noise:
        noise = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(out.device)
        out = out + noise * method.new_vocab_noise
    if method.new_vocab_scale is not None:
        out = out * method.new_vocab_scale
    return out.to(model_rows.dtype)
