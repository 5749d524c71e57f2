"""Task-vector sparsification, shared by TIES, DARE, breadcrumbs and DELLA.

A sparsifier sees one model's task vector as a stream of float32 row chunks (chunks.py), as
often as it needs to (``fit``: TIES needs two passes to find its magnitude threshold), and
returns the function that sparsifies those chunks, called on each chunk in order, once. So
a TIES merge never holds a float32 copy of a whole task vector, and the result does not
depend on the chunk size. The whole-tensor functions at the end (``magnitude``, ...) are the
same rules applied to a single chunk.

Which entries survive is mergekit 0.1.5's rule for each (mergekit/sparsify.py), except that
equal magnitudes are ranked by position (the earlier entry ranks higher) where mergekit's
``topk``/``argsort`` leave the choice to the sort implementation; README "Differences from
mergekit" lists this and the rescaling differences.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from .chunks import CHUNK, exact, float32

L1_EPS = 1e-7  # below this L1 norm (before or after the mask) nothing is rescaled, as mergekit
Sparsify = Callable[[torch.Tensor], torch.Tensor]  # a task-vector chunk -> that chunk sparsified (in place)


@dataclass(frozen=True)
class TaskVector:
    """One model's task vector (model - base), read as float32 row chunks, recomputed on each pass."""

    model: torch.Tensor
    base: torch.Tensor
    slices: Sequence[slice]

    def chunks(self) -> Iterator[torch.Tensor]:
        for s in self.slices:
            yield torch.sub(exact(self.model[s]), float32(self.base[s]))

    def shapes(self) -> Iterator[torch.Size]:
        for s in self.slices:
            yield self.base[s].shape

    @property
    def numel(self) -> int:
        return self.base.numel()


class Sparsifier(Protocol):
    def fit(self, model: int, delta: TaskVector) -> Sparsify:
        """Read the model's task vector; return the function for its chunks (called in order, once each;
        it may overwrite the chunk it is given and return it)."""
        ...


# ----------------------------------------------------------------------------- magnitude ranks

HIGH, LOW = 1 << 15, 1 << 16  # bins of the upper (sign bit clear) and lower 16 bits of a float32
# tensors with fewer entries than this are sorted: the histograms cost ~HIGH + LOW operations whatever
# the tensor's size, more than sorting a norm's few thousand entries
SORT_BELOW = 1 << 16


@dataclass(frozen=True)
class RankValue:
    """The magnitude at one rank (0 = largest) and how many entries are larger."""

    value: float
    above: int


def _upper(bits: torch.Tensor) -> torch.Tensor:
    """The upper 16 bits of int32 bit patterns (sign bit clear): on little-endian machines a strided
    int16 view, no arithmetic."""
    return bits.view(torch.int16)[1::2] if sys.byteorder == "little" else bits >> 16


def magnitude_ranks(magnitudes: torch.Tensor, ranks: Sequence[int]) -> list[RankValue]:
    """The value at each rank (0 = the largest entry) of a float32 tensor of magnitudes (>= 0),
    by radix selection: the bit patterns of non-negative float32 numbers sort as the numbers
    do, so one histogram of the upper 16 bits finds each rank's bin and one of the lower 16
    bits inside those bins finds the value. Two passes by chunks; no sort, no index tensor.
    Tensors below SORT_BELOW entries are sorted instead: the same values and counts."""
    if magnitudes.numel() < SORT_BELOW:
        ordered = torch.sort(magnitudes.reshape(-1), descending=True).values
        return [RankValue(ordered[r].item(), int((ordered > ordered[r]).sum())) for r in ranks]
    bits = magnitudes.reshape(-1).view(torch.int32)
    pieces = [bits[s : s + CHUNK] for s in range(0, bits.numel(), CHUNK)]
    high = torch.zeros(HIGH, dtype=torch.int64, device=bits.device)
    for piece in pieces:
        high += torch.bincount(_upper(piece), minlength=HIGH)

    def locate(counts: torch.Tensor, rank: int) -> tuple[int, int]:
        from_top = counts.flip(0).cumsum(0)  # from_top[i]: entries in the i + 1 highest bins
        i = int(torch.searchsorted(from_top, rank + 1))  # the first bin (from the top) reaching rank
        return counts.numel() - 1 - i, int(from_top[i - 1]) if i else 0

    bins = {r: locate(high, r) for r in ranks}  # rank -> (upper bits, entries in higher bins)
    low = {b: torch.zeros(LOW, dtype=torch.int64, device=bits.device) for b, _ in bins.values()}
    for piece in pieces:
        upper = _upper(piece)
        for b, counts in low.items():
            counts += torch.bincount(piece[upper == b] & 0xFFFF, minlength=LOW)
    out = []
    for r in ranks:
        b, above = bins[r]
        lower, above_in_bin = locate(low[b], r - above)
        value = torch.tensor((b << 16) | lower, dtype=torch.int32).view(torch.float32).item()
        out.append(RankValue(value, above + above_in_bin))
    return out


def rank_band(magnitudes: torch.Tensor, first: int, stop: int) -> torch.Tensor:
    """A bool mask of the entries whose magnitude rank (0 = largest; among equal magnitudes the
    earlier entry ranks higher) lies in [first, stop)."""
    found = magnitude_ranks(magnitudes, [stop - 1] + ([first] if first > 0 else []))
    keep = magnitudes > found[0].value  # found[0]: the smallest magnitude kept
    if first > 0:  # found[1]: the largest magnitude dropped above the band
        keep &= magnitudes < found[1].value
    flat = keep.view(-1)
    for boundary in {v.value: v for v in found}.values():  # equal magnitudes, ranked by position
        where = (magnitudes.reshape(-1) == boundary.value).nonzero().squeeze(1)
        flat[where[max(first - boundary.above, 0):max(stop - boundary.above, 0)]] = True
    return keep


def _band_sparsify(delta: TaskVector, first: int, stop: int, rescale: bool) -> Sparsify:
    """Keep the band's entries; ``rescale`` restores the L1 norm (mergekit's ``RescaleNorm.l1``;
    nothing is rescaled where either norm is below L1_EPS), with both norms summed in float64.
    Holds |delta| in float32 while fitting, then one bool per entry."""
    magnitudes = torch.empty(delta.base.shape, dtype=torch.float32, device=delta.base.device)
    for s, chunk in zip(delta.slices, delta.chunks(), strict=True):
        torch.abs(chunk, out=magnitudes[s])
    keep = rank_band(magnitudes, first, stop)
    factor = None
    if rescale:
        before = float(magnitudes.sum(dtype=torch.float64))
        after = float((magnitudes * keep).sum(dtype=torch.float64))
        factor = before / after if before >= L1_EPS and after >= L1_EPS else None
    del magnitudes
    masks = (keep[s] for s in delta.slices)

    def apply(chunk: torch.Tensor) -> torch.Tensor:
        kept = chunk.mul_(next(masks))
        return kept.mul_(factor) if factor is not None else kept

    return apply


def _identity(chunk: torch.Tensor) -> torch.Tensor:
    return chunk


def _zero(chunk: torch.Tensor) -> torch.Tensor:
    return chunk.zero_()


# ----------------------------------------------------------------------------- the four rules

@dataclass(frozen=True)
class Magnitude:
    """TIES trim: keep the ``density`` fraction of entries with the largest |delta|, at least one
    for any density > 0; ``rescale`` restores delta's L1 norm."""

    density: Sequence[float]
    rescale: bool

    def fit(self, model: int, delta: TaskVector) -> Sparsify:
        density = self.density[model]
        if density >= 1.0:
            return _identity
        if density <= 0.0 or delta.numel == 0:
            return _zero
        return _band_sparsify(delta, 0, max(1, int(density * delta.numel)), self.rescale)


@dataclass(frozen=True)
class MagnitudeOutliers:
    """Model Breadcrumbs: drop the largest ``gamma`` fraction (outliers) and the smallest entries,
    keeping int(density * n) entries from the middle of the magnitude ranking (fewer outliers
    dropped when both do not fit); ``rescale`` restores delta's L1 norm."""

    density: Sequence[float]
    gamma: Sequence[float]
    rescale: bool

    def fit(self, model: int, delta: TaskVector) -> Sparsify:
        if self.density[model] >= 1.0:
            return _identity
        n = delta.numel
        n_keep = int(self.density[model] * n)
        n_bottom = max(0, n - n_keep - int(self.gamma[model] * n))
        if n_keep == 0:
            return _zero
        return _band_sparsify(delta, n - n_bottom - n_keep, n - n_bottom, self.rescale)


@dataclass(frozen=True)
class RandomDrop:
    """DARE: drop each entry with probability 1 - density; ``rescale`` divides the survivors by
    density so that E[result] = delta (the paper's rescale). The draws for one model are made
    when it is fitted (models in order: one generator stream) and kept as masks."""

    density: Sequence[float]
    rescale: bool
    generator: torch.Generator | None

    def fit(self, model: int, delta: TaskVector) -> Sparsify:
        density = self.density[model]
        if density >= 1.0:
            return _identity
        if density <= 0.0:
            return _zero
        device = delta.base.device
        masks = iter([torch.rand(shape, generator=self.generator, device=device, dtype=torch.float32) < density
                      for shape in delta.shapes()])

        def apply(chunk: torch.Tensor) -> torch.Tensor:
            kept = chunk.mul_(next(masks))
            return kept.div_(density) if self.rescale else kept

        return apply


@dataclass(frozen=True)
class RankMagnitudeSampling:
    """DELLA MagPrune: the keep probability of an entry grows linearly with its magnitude rank
    along dim 1 (a 1-D delta is one row), from density - epsilon (smallest) to density + epsilon
    (largest); ``rescale`` divides each survivor by its keep probability (the paper's rescale).
    Sampled when the model is fitted (one generator stream) and kept until its chunks come."""

    density: Sequence[float]
    epsilon: Sequence[float]
    rescale: bool
    generator: torch.Generator | None

    def fit(self, model: int, delta: TaskVector) -> Sparsify:
        density, epsilon = self.density[model], self.epsilon[model]
        if density >= 1.0:
            return _identity
        if density <= 0.0:
            return _zero
        if density + epsilon >= 1.0 or density - epsilon <= 0.0:
            raise ValueError(f"keep probabilities density +/- epsilon = {density} +/- {epsilon} must lie inside "
                             f"(0, 1); lower epsilon below {min(density, 1.0 - density):g}")
        kept = iter([self._sample(chunk, density, epsilon) for chunk in delta.chunks()])
        return lambda chunk: next(kept)

    def _sample(self, chunk: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
        rows = chunk.unsqueeze(0) if chunk.dim() < 2 else chunk  # [rows, width, ...]
        width = rows.shape[1]
        # each entry's keep probability, computed once per rank (the same float32 operations on the same
        # rank values as computing it entry by entry) and placed by the ranking's permutation
        by_rank = torch.arange(width, dtype=rows.dtype, device=rows.device)
        by_rank.mul_(2.0 * epsilon).div_(max(width - 1, 1)).add_(density - epsilon)
        p_keep = rank_values(rows, by_rank)
        keep = torch.rand(rows.shape, generator=self.generator, device=chunk.device) < p_keep
        kept = rows.mul_(keep)
        if self.rescale:
            kept = kept.div_(p_keep)
        return kept.reshape(chunk.shape)


def row_ranks(rows: torch.Tensor) -> torch.Tensor:
    """The magnitude rank of each entry along dim 1 of float32 `rows`, as float32 (rank_values with
    each rank's own number): 0 for the smallest, width - 1 for the largest. Equal magnitudes are
    ranked in the order torch's (unstable) argsort leaves them, as before this function existed: a
    stable order would change which entries DELLA keeps for a given seed (a third of them on
    bfloat16 task vectors, whose magnitudes tie often).

    The sort runs on the magnitudes' int32 bit patterns: non-negative float32 numbers order as their
    bit patterns do, so the comparisons, and with them the order left to equal magnitudes, are the
    float sort's (tests/test_streaming.py checks this on tie-heavy rows), without its NaN handling
    (40% of DELLA's time on CPU)."""
    return rank_values(rows, torch.arange(rows.shape[1], dtype=rows.dtype, device=rows.device))


def rank_values(rows: torch.Tensor, by_rank: torch.Tensor) -> torch.Tensor:
    """by_rank[r] at each entry of `rows` whose magnitude rank along dim 1 is r (row_ranks: the
    inverse permutation of the magnitudes' argsort, scattered)."""
    order = torch.argsort(rows.abs().view(torch.int32), dim=1)
    out = torch.empty_like(rows)
    out.scatter_(1, order, by_rank.view(1, -1, *([1] * (rows.dim() - 2))).expand_as(rows))
    return out


# ----------------------------------------------------------------------------- whole tensors

def sparsify_whole(sparsifier: Sparsifier, delta: torch.Tensor, model: int = 0) -> torch.Tensor:
    """A sparsifier's rule on one whole float32 task vector (one chunk; the base is zero)."""
    tv = TaskVector(delta, torch.zeros((), dtype=delta.dtype, device=delta.device).expand(delta.shape),
                    [slice(None)])
    return sparsifier.fit(model, tv)(float32(delta))


def magnitude(delta: torch.Tensor, density: float, rescale: bool) -> torch.Tensor:
    return sparsify_whole(Magnitude([density], rescale), delta)


def magnitude_outliers(delta: torch.Tensor, density: float, gamma: float, rescale: bool) -> torch.Tensor:
    return sparsify_whole(MagnitudeOutliers([density], [gamma], rescale), delta)


def random_drop(delta: torch.Tensor, density: float, rescale: bool,
                generator: torch.Generator | None) -> torch.Tensor:
    return sparsify_whole(RandomDrop([density], rescale, generator), delta)


def rank_magnitude_sampling(delta: torch.Tensor, density: float, epsilon: float, rescale: bool,
                            generator: torch.Generator | None) -> torch.Tensor:
    return sparsify_whole(RankMagnitudeSampling([density], [epsilon], rescale, generator), delta)


__all__ = ["Magnitude", "MagnitudeOutliers", "RandomDrop", "RankMagnitudeSampling", "Sparsifier", "TaskVector",
           "magnitude", "magnitude_outliers", "magnitude_ranks", "random_drop", "rank_magnitude_sampling",
           "rank_values", "row_ranks", "sparsify_whole"]
