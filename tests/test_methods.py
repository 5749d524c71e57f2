"""Each merge method against hand-computed tensors and identities, plus a shared
contract suite that runs every registered method on degenerate inputs."""

from __future__ import annotations

import math

import pytest
import torch

from merge_engine.executor import _kwarg
from merge_engine.methods import REGISTRY, get_method
from merge_engine.methods import sparsify

T = torch.tensor


def run(name, tensors, base=None, generator=None, **params):
    spec = get_method(name)
    return spec([T(x, dtype=torch.float32) for x in tensors],
                   None if base is None else T(base, dtype=torch.float32),
                   generator=generator, **{_kwarg(k): v for k, v in params.items()})


def close(a, b, tol=1e-5):
    return torch.allclose(a, T(b, dtype=torch.float32), atol=tol)


# ---- hand-computed results --------------------------------------------------------

def test_linear_weighted_average():
    assert close(run("linear", [[1, 2], [3, 6]], weight=[1, 3], normalize=True), [2.5, 5.0])
    assert close(run("linear", [[1, 2], [3, 6]], weight=[1, 3], normalize=False), [10, 20])


def test_task_arithmetic():
    out = run("task_arithmetic", [[2, 3], [0, 1]], base=[1, 1], weight=[1, 0.5])
    assert close(out, [1.5, 3.0])
    out = run("task_arithmetic", [[2, 3], [0, 1]], base=[1, 1], weight=[1, 0.5], lambda_=2.0)
    assert close(out, [2.0, 5.0])


def test_ties_sign_election_and_disjoint_mean():
    out = run("ties", [[1, -2, 3, 0.1], [-1, -1, 1, 0.2]], base=[0, 0, 0, 0], weight=[1, 1], density=[1, 1])
    assert close(out, [1.0, -1.5, 2.0, 0.15])


def test_ties_trims_by_magnitude():
    out = run("ties", [[1, -2, 3, 0.1], [-1, -0.5, 2, 0.2]], base=[0, 0, 0, 0], weight=[1, 1],
              density=[0.5, 0.5])
    assert close(out, [-1.0, -2.0, 2.5, 0.0])


def test_breadcrumbs_drops_outliers_and_small():
    delta = T([float(i) for i in range(1, 11)])
    kept = sparsify.magnitude_outliers(delta, density=0.5, gamma=0.1, rescale=False)
    assert close(kept, [0, 0, 0, 0, 5, 6, 7, 8, 9, 0])


def test_slerp_endpoints_and_midpoint():
    a, b = [1.0, 0.0], [0.0, 1.0]
    assert close(run("slerp", [b], base=a, t=0.0), a)
    assert close(run("slerp", [b], base=a, t=1.0), b)
    h = math.sqrt(0.5)
    assert close(run("slerp", [b], base=a, t=0.5), [h, h])
    # nearly colinear inputs fall back to lerp
    assert close(run("slerp", [[2.0, 2.0]], base=[1.0, 1.0], t=0.5), [1.5, 1.5])


def test_spherical_means_of_orthogonal_vectors():
    h = math.sqrt(0.5)
    assert close(run("nuslerp", [[1, 0], [0, 1]], weight=[1, 1]), [h, h])
    assert close(run("nuslerp", [[1, 0], [0, 1]], weight=[1, 0]), [1, 0])
    assert close(run("multislerp", [[1, 0], [0, 1]], weight=[1, 1]), [h, h])
    assert close(run("karcher", [[1, 0], [0, 1]], weight=[1, 1]), [h, h])
    # with a base, multislerp works on task vectors
    assert close(run("multislerp", [[2, 1], [1, 2]], base=[1, 1], weight=[1, 1]), [1 + h, 1 + h])


def test_karcher_mean_is_fixed_point_on_three_directions():
    out = run("karcher", [[1, 0, 0], [0, 1, 0], [0, 0, 1]], weight=[1, 1, 1], max_iter=50)
    s = 1 / math.sqrt(3)
    assert close(out, [s, s, s], tol=1e-4)


def test_model_stock_interpolation_ratio():
    # orthogonal task vectors: cos = 0 -> t = 0 -> base
    assert close(run("model_stock", [[1, 0], [0, 1]], base=[0, 0]), [0, 0])
    # identical task vectors: cos = 1 -> t = 2 / 2 = 1 -> the average
    assert close(run("model_stock", [[1, 1], [1, 1]], base=[0, 0]), [1, 1])
    # cos = 0.5 (60 degrees): t = 2*0.5 / 1.5 = 2/3 of the way to the average
    out = run("model_stock", [[1, 0], [0.5, math.sqrt(0.75)]], base=[0, 0])
    avg = T([0.75, math.sqrt(0.75) / 2])
    assert torch.allclose(out, avg * (2 / 3), atol=1e-5)


def test_nearswap():
    assert close(run("nearswap", [[0.1, 2.0]], base=[0.0, 0.0], t=0.5), [0.1, 0.5])


def test_sce_weights_by_energy_and_erases_minority_sign():
    assert close(run("sce", [[1, 1], [1, -3]], base=[0, 0], select_topk=1.0), [1.0, -3.0])


def test_passthrough_scale():
    assert close(run("passthrough", [[1, 2]], scale=[2.0]), [2, 4])


# ---- identities -----------------------------------------------------------------

def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_one_model_linear_is_that_model():
    x = rand(8, 4)
    assert torch.equal(get_method("linear")([x], None, weight=[0.7], normalize=True), x * 0.7 / 0.7)


def test_ties_density_one_single_model_equals_task_arithmetic():
    base, x = rand(16, 8, seed=1), rand(16, 8, seed=2)
    ties = get_method("ties")([x], base, weight=[0.6], density=[1.0], normalize=False)
    ta = get_method("task_arithmetic")([x], base, weight=[0.6])
    assert torch.allclose(ties, ta)


def test_dare_linear_density_one_equals_task_arithmetic():
    base, a, b = rand(32, seed=1), rand(32, seed=2), rand(32, seed=3)
    dare = get_method("dare_linear")([a, b], base, weight=[0.3, 0.5], density=[1.0, 1.0])
    ta = get_method("task_arithmetic")([a, b], base, weight=[0.3, 0.5])
    assert torch.allclose(dare, ta)


def test_dare_rescale_preserves_expectation_with_seeded_generator():
    delta = torch.ones(200_000)
    g = torch.Generator().manual_seed(1234)
    kept = sparsify.random_drop(delta, 0.3, rescale=True, generator=g)
    assert abs(kept.mean().item() - 1.0) < 0.02
    assert abs((kept != 0).float().mean().item() - 0.3) < 0.01
    again = sparsify.random_drop(delta, 0.3, rescale=True, generator=torch.Generator().manual_seed(1234))
    assert torch.equal(kept, again)
    unscaled = sparsify.random_drop(delta, 0.3, rescale=False, generator=torch.Generator().manual_seed(1234))
    assert abs(unscaled.mean().item() - 0.3) < 0.01


def test_della_keeps_large_entries_more_often_and_preserves_expectation():
    rows = torch.arange(1, 101, dtype=torch.float32).repeat(2000, 1)  # [2000, 100]
    g = torch.Generator().manual_seed(7)
    kept = sparsify.rank_magnitude_sampling(rows, density=0.5, epsilon=0.3, rescale=False, generator=g)
    keep_rate = (kept != 0).float().mean(dim=0)
    assert abs(keep_rate[0].item() - 0.2) < 0.03 and abs(keep_rate[-1].item() - 0.8) < 0.03
    g = torch.Generator().manual_seed(7)
    scaled = sparsify.rank_magnitude_sampling(rows, density=0.5, epsilon=0.3, rescale=True, generator=g)
    assert torch.allclose(scaled.mean(dim=0), rows[0], rtol=0.25)  # per column: ~5 sigma
    assert abs(scaled.mean().item() / rows.mean().item() - 1.0) < 0.01


def test_ties_density_zero_returns_base():
    base, x = rand(10, seed=1), rand(10, seed=2)
    out = get_method("ties")([x], base, weight=[1.0], density=[0.0])
    assert torch.equal(out, base)


# ---- contract suite over every registered method ----------------------------------

def default_args(spec, n_models):
    kwargs = {}
    for p in spec.global_params:
        kwargs[_kwarg(p.name)] = 0.5 if p.required else p.default
    for p in spec.per_model_params:
        kwargs[_kwarg(p.name)] = [0.5 if p.required else p.default] * n_models
    return kwargs


def n_models_for(spec):
    return max(spec.min_models, 2) if spec.max_models is None else spec.max_models


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("shape", [(1,), (3,), (7, 5)])
def test_contract_identical_models_give_that_model(name, shape):
    spec = REGISTRY[name]
    x = rand(*shape, seed=3)
    n = n_models_for(spec)
    base = x.clone() if spec.uses_base else None
    kwargs = default_args(spec, n)
    if name == "passthrough":
        kwargs["scale"] = [1.0]
    if name in ("linear", "nuslerp", "multislerp", "karcher"):
        kwargs["weight"] = [1.0] * n
    if name in ("task_arithmetic", "dare_linear", "breadcrumbs", "della_linear", "dare_ties",
                "breadcrumbs_ties"):
        kwargs["weight"] = [1.0 / n] * n  # unnormalised methods: weights summing to 1
    g = torch.Generator().manual_seed(0)
    out = spec([x.clone() for _ in range(n)], base, generator=g, **kwargs)
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-5), name


@pytest.mark.parametrize("name", sorted(n for n, s in REGISTRY.items() if s.uses_base and s.requires_base))
def test_contract_zero_task_vectors_give_base(name):
    spec = REGISTRY[name]
    base = rand(4, 6, seed=5)
    n = n_models_for(spec)
    kwargs = default_args(spec, n)
    for density in (0.0, 1.0):
        if "density" in kwargs:
            kwargs["density"] = [density] * n
        out = spec([base.clone() for _ in range(n)], base, generator=torch.Generator().manual_seed(0), **kwargs)
        assert torch.allclose(out, base, atol=1e-6), (name, density)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_contract_spec_is_consistent(name):
    spec = REGISTRY[name]
    assert spec.name == name == spec.fn.__name__
    names = [p.name for p in spec.params]
    assert len(names) == len(set(names))
    for p in spec.params:
        assert p.required or p.default is not None or p.kind == "str", p.name
        if p.search is not None:
            assert p.kind == "float" and p.search[0] < p.search[1]
    assert spec.paper and spec.description


def test_unknown_method_suggests():
    with pytest.raises(ValueError, match="did you mean 'ties'"):
        get_method("tise")
