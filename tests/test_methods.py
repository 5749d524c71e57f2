"""Each merge method against hand-computed tensors and identities, plus a shared
contract suite that runs every registered method on degenerate inputs."""

from __future__ import annotations

import math

import pytest
import torch

from merge_engine.methods import REGISTRY, get_method, sparsify
from merge_engine.methods.spec import kwarg_name

T = torch.tensor


def run(name, tensors, base=None, generator=None, **params):
    spec = get_method(name)
    return spec([T(x, dtype=torch.float32) for x in tensors],
                   None if base is None else T(base, dtype=torch.float32),
                   generator=generator, **{kwarg_name(k): v for k, v in params.items()})


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


def test_arcee_fusion_takes_the_upper_outliers_of_a_1d_tensor():
    # 1-D: one softmax row, so importance = K * |delta| with one K > 0 (x's softmax is not the base's).
    # |delta| sorted: 1 1 1 2 2 2 3 4.5 5.5 10 (n = 10, last index 9): Q1 = [2] = 1, Q2 = [4] = 2,
    # Q3 = [6] = 3; fence = K * (2 + 1.5 * (3 - 1)) = 5K: the entries of magnitude 5.5 and 10 (here -10)
    # are taken, 4.5 is not (a fence of Q2 + 1 IQR would take it, Q2 + 2 IQR would drop 5.5).
    base = [0.5] * 10
    delta = [2, -10, 1, 4.5, 3, 1, 2, 5.5, 1, 2]
    out = run("arcee_fusion", [[b + d for b, d in zip(base, delta, strict=True)]], base=base)
    assert close(out, [0.5, -9.5, 0.5, 0.5, 0.5, 0.5, 0.5, 6.0, 0.5, 0.5])


def test_arcee_fusion_ignores_a_change_that_leaves_the_rows_softmax_alone():
    # row 0 moves by +100 everywhere: softmax is shift-invariant, KL = 0, importance 0 (the largest |delta|,
    # yet not taken). Rows 1 and 2 are the same change [1 1 1 1 1 4] (same K > 0): importance K * |delta|.
    # All 18 scores sorted: six 0, ten K, two 4K (last index 17): Q1 = [4] = 0, Q2 = [8] = K, Q3 = [12] = K;
    # fence = K + 1.5 * (K - 0) = 2.5K: only the two 4K entries are taken.
    base = [[0.0] * 6] * 3
    x = [[100.0] * 6, [1, 1, 1, 1, 1, 4], [1, 1, 1, 1, 1, 4]]
    out = run("arcee_fusion", [x], base=base)
    assert close(out, [[0.0] * 6, [0, 0, 0, 0, 0, 4], [0, 0, 0, 0, 0, 4]])


def test_arcee_fusion_single_entry_and_unchanged_tensor():
    # one entry: Q1 = Q2 = Q3 = s, fence s, s >= s: taken. No change: all scores 0 >= fence 0: the base.
    assert close(run("arcee_fusion", [[3.0]], base=[1.0]), [3.0])
    assert close(run("arcee_fusion", [[1.0, 2.0, 3.0]], base=[1.0, 2.0, 3.0]), [1.0, 2.0, 3.0])


def test_ram_averages_shared_entries_and_keeps_unique_ones():
    # task vectors (base 1): d1 = [3, 1, -2, 0, 0], d2 = [0, 2, 4, 0, 1e-6], d3 = [3, 0, 1, 0, 0]
    # entry 0: d1, d3 changed -> (3 + 3) / 2 = 3;  entry 1: d1, d2 -> (1 + 2) / 2 = 1.5
    # entry 2: all three -> (-2 + 4 + 1) / 3 = 1;  entry 3: none -> 0;  entry 4: 1e-6 <= epsilon 1e-5 -> 0
    base = [1.0] * 5
    xs = [[4, 2, -1, 1, 1], [1, 3, 5, 1, 1 + 1e-6], [4, 1, 2, 1, 1]]
    assert close(run("ram", xs, base=base), [4.0, 2.5, 2.0, 1.0, 1.0])
    # epsilon 1.5 drops d1[1] = 1 and d3[2] = 1: entry 1 is d2's alone (2), entry 2 is (-2 + 4) / 2 = 1
    assert close(run("ram", xs, base=base, epsilon=1.5), [4.0, 3.0, 2.0, 1.0, 1.0])
    # a change of exactly epsilon counts as none (|delta| > epsilon): d1 = [0.5, 2], d2 = [0, 0.5] with epsilon
    # 0.5 leave entry 0 unchanged and entry 1 to d1 alone
    assert close(run("ram", [[1.5, 3.0], [1.0, 1.5]], base=[1.0, 1.0], epsilon=0.5), [1.0, 3.0])


def test_ramplus_tl_scales_unique_entries_by_the_shared_to_unique_ratio():
    # d1 = [2, 4, 1, 2, 0, 0], d2 = [4, -2, 0, 0, 4, 0] (base 0): entries 0, 1 shared, 2, 3 d1's alone,
    # 4 d2's alone. rho1 = 2 shared / 2 unique = 1, rho2 = 2 / 1 = 2.
    # r 0.5, alpha 1.5: lambda1 = 1 + 0.5 * 1 = 1.5, lambda2 = 1 + 0.5 * min(2, 1.5) = 1.75
    # -> [(2 + 4) / 2, (4 - 2) / 2, 1 * 1.5, 2 * 1.5, 4 * 1.75, 0]
    xs = [[2, 4, 1, 2, 0, 0], [4, -2, 0, 0, 4, 0]]
    assert close(run("ramplus_tl", xs, base=[0.0] * 6, r=0.5, alpha=1.5), [3.0, 1.0, 1.5, 3.0, 7.0, 0.0])
    # defaults r 0.1, alpha 0.2: both rho above the cap, lambda = 1.02
    assert close(run("ramplus_tl", xs, base=[0.0] * 6), [3.0, 1.0, 1.02, 2.04, 4.08, 0.0])
    # r 0: RAM
    assert close(run("ramplus_tl", xs, base=[0.0] * 6, r=0.0), [3.0, 1.0, 1.0, 2.0, 4.0, 0.0])


# ---- identities -----------------------------------------------------------------

def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_one_model_linear_is_that_model():
    x = rand(8, 4)
    assert torch.allclose(get_method("linear")([x], None, weight=[0.7], normalize=True), x, atol=1e-6)


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


# ---- contract suite over every registered method ------------------------------------
# (optuna's BasicSamplerTestCase pattern: every registered method runs through the same cases, with non-zero
# task vectors, so a method that ignores its weights, its density or its base fails here.)
# Expectations are written as the result "base + c * delta" with c worked out by hand from each method's
# definition; a new method must add its row to ONE_MODEL and, if it merges two or more, to ALIGNED.

SHAPES = [(1,), (3,), (5, 7)]  # tensors of 1 to 35 elements


def default_args(spec, n_models, **overrides):
    """Keyword arguments for spec.fn: the spec's defaults (0.5 where required), then overrides; a scalar
    override of a per-model parameter applies to every model."""
    kwargs = {}
    for p in spec.params:
        value = overrides.get(p.name, 0.5 if p.required else p.default)
        if p.scope == "per_model" and not isinstance(value, list):
            value = [value] * n_models
        kwargs[kwarg_name(p.name)] = value
    return kwargs


def n_models_for(spec):
    return max(spec.min_models, 2) if spec.max_models is None else spec.max_models


def call(name, tensors, base, **overrides):
    spec = REGISTRY[name]
    kwargs = default_args(spec, len(tensors), **overrides)
    return spec([t.clone() for t in tensors], None if base is None else base.clone(),
                   generator=torch.Generator().manual_seed(0), **kwargs)


# One model x = base + delta with weight 0.6 (density 1 where the method has one):
# name -> (parameter overrides, c) with expected = base + c * delta; c = None: expected = x * scale (passthrough);
# c = "fence": expected = fused_by_fence(base, x) (arcee_fusion keeps each entry of the base or of x).
ONE_MODEL = {
    "linear": ({"weight": 0.6}, 1.0),  # normalised: the model itself
    "passthrough": ({"scale": 0.6}, None),
    "task_arithmetic": ({"weight": 0.6}, 0.6),
    "ties": ({"weight": 0.6, "density": 1.0}, 1.0),  # normalised by the weight of the agreeing model
    "dare_ties": ({"weight": 0.6, "density": 1.0}, 0.6),
    "dare_linear": ({"weight": 0.6, "density": 1.0}, 0.6),
    "breadcrumbs": ({"weight": 0.6, "density": 1.0, "gamma": 0.0}, 0.6),
    "breadcrumbs_ties": ({"weight": 0.6, "density": 1.0, "gamma": 0.0}, 0.6),
    "della": ({"weight": 0.6, "density": 1.0}, 1.0),  # mergekit: density 1 keeps the delta whatever epsilon
    "della_linear": ({"weight": 0.6, "density": 1.0}, 0.6),
    "sce": ({}, 1.0),  # one model carries all the energy
    "slerp": ({"t": 1.0}, 1.0),
    "nearswap": ({"t": 1e9}, 1.0),  # every entry is "close": take the other model
    "multislerp": ({"weight": 0.6}, 1.0),
    "karcher": ({"weight": 0.6}, 1.0),
    "ram": ({}, 1.0),  # a lone model changed every entry alone: all unique, kept as they are
    "ramplus_tl": ({}, 1.0),  # no shared entries: rho = 0, lambda = 1
    "arcee_fusion": ({}, "fence"),  # entry by entry the base or the model: fused_by_fence below
}
# Two models whose task vectors point the same way (delta_2 = 2 delta_1) with weights 0.3 and 0.5: no sign
# conflict, no spherical bend, so c follows from the weights alone. Normalising methods divide by 0.8.
ALIGNED = {
    "linear": 1.625,  # (0.3 * 1 + 0.5 * 2) / 0.8 (no base: delta is the model)
    "task_arithmetic": 1.3,  # 0.3 * 1 + 0.5 * 2
    "ties": 1.625,
    "dare_ties": 1.3,
    "dare_linear": 1.3,
    "breadcrumbs": 1.3,
    "breadcrumbs_ties": 1.3,
    "della": 1.625,
    "della_linear": 1.3,
    "sce": 1.8,  # energies 1 : 4 -> weights 0.2, 0.8: 0.2 * 1 + 0.8 * 2
    "model_stock": 1.5,  # cos = 1 -> t = 1: the average of the two models
    "multislerp": 1.625,  # one direction; norm = weighted mean of the norms
    "karcher": 1.625,
    "nuslerp": 1.625,  # colinear: lerp with t = 0.5 / 0.8
    "ram": 1.5,  # every entry changed by both: shared, plain mean (no weights)
    "ramplus_tl": 1.5,  # no unique entries to rescale
}
ALIGNED_OVERRIDES = {"density": 1.0, "gamma": 0.0, "weight": [0.3, 0.5]}


def case_tensors(shape, dtype=torch.float32, seed=3):
    """base and a task vector with no zero entries (so sparsifiers and sign election have work to do)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    delta = torch.randn(shape, generator=g)
    delta = delta + delta.sign()  # |delta| >= 1: bf16 rounding stays well inside the tolerance
    return base.to(dtype), delta.to(dtype)


def task_vector_base(spec) -> bool:
    """Whether the contract cases give this method a base to take task vectors from. karcher averages an
    optional base in as one more point (mergekit), so its cases run without one."""
    return spec.uses_base and spec.name != "karcher"


def fused_by_fence(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """arcee_fusion restated from its definition in Python floats (not our torch code): per last-dim row
    KL(softmax(x) + 1e-8 || softmax(base) + 1e-8) times |x - base| per entry; take x where that score
    reaches Q2 + 1.5 (Q3 - Q1), Qk the floor(k (n - 1) / 4)-th smallest score. The contract tensors are
    random, so unlike the other rows no single c describes the result."""
    def softmax(row):
        top = max(row)
        e = [math.exp(v - top) for v in row]
        return [v / sum(e) + 1e-8 for v in e]

    b_rows, x_rows = base.double().reshape(-1, base.shape[-1]).tolist(), x.double().reshape(-1, x.shape[-1]).tolist()
    scores = []
    for b_row, x_row in zip(b_rows, x_rows, strict=True):
        p, q = softmax(x_row), softmax(b_row)
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
        scores += [abs(xv - bv) * kl for xv, bv in zip(x_row, b_row, strict=True)]
    ordered, last = sorted(scores), len(scores) - 1
    fence = ordered[2 * last // 4] + 1.5 * (ordered[3 * last // 4] - ordered[last // 4])
    flat_b, flat_x = sum(b_rows, []), sum(x_rows, [])
    fused = [xv if s >= fence else bv for s, xv, bv in zip(scores, flat_x, flat_b, strict=True)]
    return torch.tensor(fused, dtype=torch.float32).reshape(base.shape)


def test_contract_every_method_has_hand_computed_cases():
    for name, spec in REGISTRY.items():
        if spec.min_models == 1:
            assert name in ONE_MODEL, f"add the one-model expectation of {name} to ONE_MODEL"
        if spec.max_models is None or spec.max_models >= 2:
            assert name in ALIGNED, f"add the two-model expectation of {name} to ALIGNED"


@pytest.mark.parametrize("name", sorted(ONE_MODEL))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_contract_one_model(name, shape, dtype):
    spec = REGISTRY[name]
    overrides, c = ONE_MODEL[name]
    base, delta = case_tensors(shape, dtype)
    with_base = task_vector_base(spec)
    x = base + delta if with_base else delta
    out = call(name, [x], base if with_base else None, **overrides)
    f32 = lambda t: t.to(torch.float32)  # noqa: E731
    if c is None:
        expected = f32(x) * overrides["scale"]
    elif c == "fence":
        expected = fused_by_fence(f32(base), f32(x))
    else:
        expected = (f32(base) if with_base else 0) + c * f32(delta)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert out.shape == x.shape
    assert torch.allclose(f32(out), expected, atol=tol, rtol=tol), (name, out, expected)


@pytest.mark.parametrize("name", sorted(ALIGNED))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
def test_contract_aligned_task_vectors_weights_matter(name, shape, dtype):
    spec = REGISTRY[name]
    base, delta = case_tensors(shape, dtype)
    f32 = lambda t: t.to(torch.float32)  # noqa: E731
    with_base = task_vector_base(spec)
    if with_base:
        tensors, expected = [base + delta, base + 2 * delta], f32(base) + ALIGNED[name] * f32(delta)
    else:
        tensors, expected = [delta, 2 * delta], ALIGNED[name] * f32(delta)
    overrides = {k: v for k, v in ALIGNED_OVERRIDES.items() if spec.param(k)}
    out = call(name, tensors, base if with_base else None, **overrides)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(f32(out), expected, atol=tol, rtol=tol), (name, out, expected)


DENSITY_METHODS = sorted(n for n, s in REGISTRY.items() if s.param("density"))


@pytest.mark.parametrize("name", DENSITY_METHODS)
@pytest.mark.parametrize("shape", SHAPES)
def test_contract_density_zero_gives_base(name, shape):
    base, delta = case_tensors(shape)
    out = call(name, [base + delta, base - 2 * delta], base, density=0.0, weight=[0.3, 0.5])
    assert torch.allclose(out, base, atol=1e-6), name


def test_contract_ties_tiny_density_keeps_the_largest_entry():
    """density * numel < 1 on a 3-element tensor: the largest-magnitude entry survives."""
    base, delta = T([1.0, 1.0, 1.0]), T([0.5, -2.0, 1.0])
    out = call("ties", [base + delta], base, weight=1.0, density=0.2, normalize=False)
    assert close(out, [1.0, -1.0, 1.0]), out


@pytest.mark.parametrize("name", sorted(n for n, s in REGISTRY.items() if s.uses_base and s.requires_base))
@pytest.mark.parametrize("density", [0.0, 1.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_contract_zero_task_vectors_give_base(name, density, shape):
    spec = REGISTRY[name]
    base, _ = case_tensors(shape)
    n = n_models_for(spec)
    overrides = {"density": density} if spec.param("density") else {}
    if spec.param("t"):
        overrides["t"] = 0.5
    out = call(name, [base] * n, base, **overrides)
    assert torch.allclose(out, base, atol=1e-6), (name, density)


@pytest.mark.parametrize("name", sorted(REGISTRY))
@pytest.mark.parametrize("shape", SHAPES)
def test_contract_identical_models_give_that_model(name, shape):
    spec = REGISTRY[name]
    x, _ = case_tensors(shape)
    n = n_models_for(spec)
    overrides = {"scale": 1.0, "t": 0.5}
    if "weight" in [p.name for p in spec.params]:
        # normalising methods: any weights; unnormalised task-vector methods: weights summing to 1
        overrides["weight"] = [1.0 / n] * n
    out = call(name, [x] * n, x if spec.uses_base else None,
               **{k: v for k, v in overrides.items() if spec.param(k)})
    assert out.shape == x.shape
    assert torch.allclose(out, x, atol=1e-5), name


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
