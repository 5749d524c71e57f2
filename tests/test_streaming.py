"""Streaming methods (MethodSpec.streams): inputs in their stored dtype, float32 by row chunks.

The rules they must keep: the result does not depend on the chunk size or on the input dtype
(bfloat16 inputs give exactly what their float32 values give), inputs are never modified, and
the magnitude rank selection (radix select, no sort) picks exactly the entries a stable sort
would, with equal magnitudes ranked by position.
"""

from __future__ import annotations

import pytest
import torch

from merge_engine.methods import REGISTRY, chunks, sparsify

STREAMING = sorted(name for name, spec in REGISTRY.items() if spec.streams)
PARAMS = {"weight": [0.7, 0.45], "density": [0.5, 0.3], "gamma": [0.1, 0.05], "epsilon": [0.1, 0.05]}


def bf16_models(shape=(67, 33), seed=0):
    """Fine-tunes whose task vectors are bfloat16 differences: many exactly equal magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    base = (0.02 * torch.randn(shape, generator=gen)).bfloat16()
    tuned = [(base.float() + 0.002 * torch.randn(shape, generator=gen)).bfloat16() for _ in range(2)]
    return base, tuned


def run(method, tensors, base):
    spec = REGISTRY[method]
    tensors = tensors[: spec.max_models or len(tensors)]
    kwargs = {p.name: PARAMS[p.name][: len(tensors)] for p in spec.per_model_params if p.name in PARAMS}
    kwargs |= {p.name: 0.3 for p in spec.global_params if p.name == "t"}
    base = base if spec.uses_base else None
    return spec(tensors, base, generator=torch.Generator().manual_seed(3), **kwargs)


def test_the_task_vector_family_and_linear_stream():
    assert {"linear", "task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "slerp"} <= set(STREAMING)


@pytest.mark.parametrize("method", STREAMING)
def test_result_does_not_depend_on_chunk_size_or_input_dtype(method, monkeypatch):
    base, tuned = bf16_models()
    whole = run(method, [t.float() for t in tuned], base.float())  # one chunk, float32 inputs
    for size in (37, 33 * 5, 1 << 20):  # one row per chunk, five rows, everything
        monkeypatch.setattr(chunks, "CHUNK", size)
        assert torch.equal(run(method, tuned, base), whole), size
    assert whole.dtype == torch.float32
    assert not torch.equal(whole, base.float())


@pytest.mark.parametrize("method", STREAMING)
def test_inputs_are_never_modified(method, monkeypatch):
    monkeypatch.setattr(chunks, "CHUNK", 37)
    base, tuned = bf16_models()
    for dtype in (torch.float32, torch.bfloat16):
        inputs = [t.to(dtype) for t in tuned]
        b = base.to(dtype)
        before = [t.clone() for t in (*inputs, b)]
        run(method, inputs, b)
        assert all(torch.equal(x, y) for x, y in zip(before, (*inputs, b), strict=True))


def stable_rank_mask(magnitudes: torch.Tensor, first: int, stop: int) -> torch.Tensor:
    """The reference: a stable sort by decreasing magnitude (equal ones keep their order)."""
    order = torch.sort(-magnitudes.reshape(-1), stable=True).indices
    keep = torch.zeros(magnitudes.numel(), dtype=torch.bool)
    keep[order[first:stop]] = True
    return keep.view(magnitudes.shape)


@pytest.mark.parametrize("path", ["radix", "sort"])
@pytest.mark.parametrize("seed", range(4))
def test_rank_band_equals_a_stable_sort_with_many_ties(seed, path, monkeypatch):
    monkeypatch.setattr(sparsify, "CHUNK", 53)  # the radix passes run over many pieces
    monkeypatch.setattr(sparsify, "SORT_BELOW", 0 if path == "radix" else 1 << 16)
    gen = torch.Generator().manual_seed(seed)
    magnitudes = (torch.randint(0, 9, (41, 23), generator=gen).float() * 0.125).abs()  # 9 distinct values
    n = magnitudes.numel()
    for first, stop in ((0, 1), (0, n // 2), (5, n // 3), (n // 4, n - 7), (0, n), (n - 1, n)):
        assert torch.equal(sparsify.rank_band(magnitudes, first, stop), stable_rank_mask(magnitudes, first, stop))


@pytest.mark.parametrize("path", ["radix", "sort"])
def test_magnitude_ranks_of_distinct_values_match_sorting(path, monkeypatch):
    monkeypatch.setattr(sparsify, "SORT_BELOW", 0 if path == "radix" else 1 << 16)
    gen = torch.Generator().manual_seed(1)
    magnitudes = torch.randn(10_000, generator=gen).abs() * torch.logspace(-8, 8, 10_000)
    ordered = torch.sort(magnitudes, descending=True).values
    found = sparsify.magnitude_ranks(magnitudes, [0, 17, 5000, 9999])
    assert [f.value for f in found] == [ordered[r].item() for r in (0, 17, 5000, 9999)]
    assert [f.above for f in found] == [0, 17, 5000, 9999]


def test_equal_magnitudes_are_kept_in_order_of_position():
    delta = torch.tensor([1.0, -2.0, 2.0, 1.0, 2.0, -0.5])
    # TIES at density 0.34 keeps int(0.34 * 6) = 2 entries: the first two of the three magnitudes 2
    assert torch.equal(sparsify.magnitude(delta, 0.34, rescale=False), torch.tensor([0, -2.0, 2.0, 0, 0, 0]))
    # breadcrumbs (density 0.5, gamma 1/6) keeps ranks 1-3, below the one outlier: ranked by magnitude,
    # then position, they are -2 (rank 0, the outlier), 2 (pos 2), 2 (pos 4), 1 (pos 0), 1 (pos 3), -0.5
    kept = sparsify.magnitude_outliers(delta, 0.5, 1 / 6, rescale=False)
    assert torch.equal(kept, torch.tensor([1.0, 0, 2.0, 0, 2.0, 0]))


def test_l1_rescale_restores_the_norm():
    delta = torch.tensor([4.0, -3.0, 2.0, -1.0])
    kept = sparsify.magnitude(delta, 0.5, rescale=True)  # keeps 4 and -3 (L1 7), scaled to L1 10
    assert torch.allclose(kept, torch.tensor([40 / 7, -30 / 7, 0.0, 0.0]))


@pytest.mark.parametrize("width", [7, 64, 1024, 2816])
def test_row_ranks_sort_bit_patterns_as_the_float_sort_orders_ties(width):
    """row_ranks sorts the magnitudes' int32 bit patterns: the same permutation as torch's float
    argsort, ties included (DELLA's kept entries for a seed depend on it)."""
    gen = torch.Generator().manual_seed(width)
    for values in (torch.randint(0, 5, (64, width), generator=gen).float() * 0.25,  # mostly ties, zeros
                   (torch.randn(64, width, generator=gen).bfloat16().float()
                    - torch.randn(64, width, generator=gen).bfloat16().float())):  # bf16 task vector
        rows = torch.where(torch.rand(values.shape, generator=gen) < 0.5, values, -values)
        order = torch.argsort(rows.abs(), dim=1)
        expected = torch.empty_like(rows).scatter_(1, order, torch.arange(width, dtype=rows.dtype).expand_as(rows))
        assert torch.equal(sparsify.row_ranks(rows), expected)
