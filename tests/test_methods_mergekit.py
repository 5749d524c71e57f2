"""Merge methods compute what mergekit 0.1.5 computes (README "Differences from
mergekit" lists the exceptions).

Expected values are worked out by hand in the comments, or by a direct
restatement of mergekit's formula in this file (never by calling our code).
Task vectors are non-zero and the inputs are chosen so that the answer depends
on the behaviour under test.
"""

from __future__ import annotations

import inspect
import math

import jinja2
import pytest
import torch
from jinja2.sandbox import ImmutableSandboxedEnvironment

from merge_engine import RecipeError, parse_recipe
from merge_engine.io.chat_templates import CHAT_TEMPLATES
from merge_engine.methods import REGISTRY, get_method

H = math.sqrt(0.5)


def t(*rows) -> torch.Tensor:
    if len(rows) == 1 and isinstance(rows[0], torch.Tensor):
        return rows[0].float()
    return torch.tensor(rows if len(rows) > 1 else rows[0], dtype=torch.float32)


def merge(name: str, tensors, base=None, seed: int = 0, **params) -> torch.Tensor:
    return get_method(name)([t(x) for x in tensors], None if base is None else t(base),
                            generator=torch.Generator().manual_seed(seed), **params)


def assert_close(actual: torch.Tensor, expected, tol: float = 1e-5) -> None:
    expected = expected if isinstance(expected, torch.Tensor) else t(expected)
    assert torch.allclose(actual, expected, atol=tol, rtol=0), f"\n{actual}\n!=\n{expected}"


# ---- multislerp: tangent-space projection ---------------------------------------------

def test_multislerp_is_the_normalised_weighted_mean_direction_times_mean_norm():
    # mergekit projects u_i - (u_i.m) m; summed with the weights this is the tangent part of
    # sum_i w_i u_i, which is parallel to m, so it vanishes: the result is m scaled by the
    # weighted mean norm. u = [1, 0] (norm 2), [0, 1] (norm 1), weights 1:3 ->
    # m = [1, 3] / sqrt(10), scale = 0.25 * 2 + 0.75 * 1 = 1.25. (A log-map step would
    # land at 67.5 degrees instead of atan(3) = 71.6 degrees.)
    out = merge("multislerp", [[2.0, 0.0], [0.0, 1.0]], weight=[1.0, 3.0])
    assert_close(out, [1.25 / math.sqrt(10), 3.75 / math.sqrt(10)])


def test_multislerp_with_base_and_three_models_restated():
    base = [0.5, -1.0, 2.0, 0.0]
    xs = [[1.5, -0.5, 2.5, 1.0], [0.0, 1.0, 1.0, -0.5], [2.0, -2.0, 3.0, 0.5]]
    weight, eps = [0.2, 0.5, 0.3], 1e-8
    # mergekit 0.1.5 multislerp, restated
    d = torch.stack([t(x) - t(base) for x in xs])
    w = t(weight) / sum(weight)
    norms = d.norm(dim=-1, keepdim=True)
    units = d / (norms + eps)
    m = (units * w[:, None]).sum(0)
    m = m / m.norm()
    tangent = ((units - (units * m).sum(-1, keepdim=True) * m) * w[:, None]).sum(0)
    tn = tangent.norm() + eps
    expected = (m * torch.cos(tn) + tangent * torch.sin(tn) / tn) * (norms.squeeze(-1) * w).sum() + t(base)
    assert_close(merge("multislerp", xs, base=base, weight=weight), expected)


def test_multislerp_antipodal_pair_falls_back_to_lerp_and_three_cancelling_raise():
    # mean direction zero: two tensors lerp with the weights, more raise
    assert_close(merge("multislerp", [[1.0, 2.0], [-2.0, -4.0]], weight=[1.0, 1.0]), [-0.5, -1.0])
    with pytest.raises(ValueError, match="mean direction is zero"):
        merge("multislerp", [[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0], [-3.0, 0.0]], weight=[1.0, 1.0, 1.0, 1.0])


def test_multislerp_of_zero_task_vectors_is_the_base():
    # difference from mergekit (which raises): tensors no model changed merge to the base
    base = [0.5, -1.0, 2.0]
    assert_close(merge("multislerp", [base, base, base], base=base, weight=[0.2, 0.5, 0.3]), base)


# ---- karcher: the base model takes part ------------------------------------------------

def test_karcher_averages_the_base_model_in():
    # base [2, 0] and one model [0, 1], weight 1 each: the Karcher mean of two directions is
    # their geodesic midpoint (45 degrees), scaled by the mean norm (2 + 1) / 2 = 1.5
    assert_close(merge("karcher", [[0.0, 1.0]], base=[2.0, 0.0], weight=[1.0]), [1.5 * H, 1.5 * H])


def test_karcher_weights_the_models_against_the_base_weight_one():
    # model weight 3, base weight 1: the weighted Karcher mean of two points lies 3/4 of the
    # way along the geodesic from the base: 67.5 degrees; norms 1 -> scale 1
    out = merge("karcher", [[0.0, 1.0]], base=[1.0, 0.0], weight=[3.0], max_iter=50, tol=1e-7)
    a = math.radians(67.5)
    assert_close(out, [math.cos(a), math.sin(a)], tol=1e-4)


# ---- DELLA ------------------------------------------------------------------------------

def test_della_at_density_one_returns_the_delta_unchanged_whatever_epsilon():
    # no pruning at all; TIES consensus on [1, -2, 3] and [-1, -1, 2]: signs elected by sum
    # (0 -> +, -3 -> -, 5 -> +), disjoint mean: [1, (-2 - 1) / 2, (3 + 2) / 2]
    xs, base = [[2.0, -1.0, 4.0], [0.0, 0.0, 3.0]], [1.0, 1.0, 1.0]
    out = merge("della", xs, base=base, weight=[1.0, 1.0], density=[1.0, 1.0], epsilon=[0.15, 0.3])
    assert_close(out, [2.0, -0.5, 3.5])
    out = merge("della_linear", xs, base=base, weight=[0.5, 0.25], density=[1.0, 1.0], epsilon=[0.15, 0.15])
    assert_close(out, [1.0 + 0.5 - 0.25, 1.0 - 1.0 - 0.25, 1.0 + 1.5 + 0.5])


@pytest.mark.parametrize("density, epsilon", [(0.9, 0.15), (0.1, 0.1), (0.5, 0.6)])
def test_della_keep_probabilities_outside_0_1_raise(density, epsilon):
    with pytest.raises(ValueError, match="must lie inside"):
        merge("della", [[2.0, -1.0, 4.0, 0.5]], base=[1.0, 1.0, 1.0, 1.0], weight=[1.0], density=[density],
              epsilon=[epsilon])


def test_della_ranks_along_dim_1_of_a_3d_tensor():
    # [2, 3, 2]: ranks run along dim 1 (3 entries) separately for each (dim 0, dim 2) pair,
    # so keep probabilities are 0.2 / 0.5 / 0.8 by rank within each column of 3; with
    # rescale=False every survivor is the delta itself
    delta = torch.tensor([[[1.0, 30.0], [2.0, 20.0], [3.0, 10.0]],
                          [[6.0, 0.4], [5.0, 0.5], [4.0, 0.6]]])
    counts = torch.zeros_like(delta)
    for seed in range(400):
        out = merge("della_linear", [delta], base=torch.zeros_like(delta), seed=seed, weight=[1.0], density=[0.5],
                    epsilon=[0.3], rescale=False)
        assert torch.all((out == 0) | (out == delta))
        counts += out != 0
    rate = counts / 400
    expected = torch.tensor([[[0.2, 0.8], [0.5, 0.5], [0.8, 0.2]],
                             [[0.8, 0.2], [0.5, 0.5], [0.2, 0.8]]])
    assert torch.allclose(rate, expected, atol=0.1), rate


# ---- TIES and rescale ----------------------------------------------------------------------

def test_ties_keeps_at_least_one_entry_when_density_times_n_is_below_one():
    # int(0.2 * 3) = 0, mergekit keeps max(1, 0) = 1 entry: the largest |delta| = -2
    out = merge("ties", [[1.5, -1.0, 2.0]], base=[1.0, 1.0, 1.0], weight=[1.0], density=[0.2])
    assert_close(out, [1.0, -1.0, 1.0])


def test_ties_rescale_restores_the_l1_norm():
    # delta [1, -2, 3, 0.5], density 0.5 keeps [0, -2, 3, 0]; L1 6.5 / 5 = 1.3
    out = merge("ties", [[1.0, -2.0, 3.0, 0.5]], base=[0.0] * 4, weight=[1.0], density=[0.5], rescale=True)
    assert_close(out, [0.0, -2.6, 3.9, 0.0])
    out = merge("ties", [[1.0, -2.0, 3.0, 0.5]], base=[0.0] * 4, weight=[1.0], density=[0.5])
    assert_close(out, [0.0, -2.0, 3.0, 0.0])  # default: rescale false, as mergekit


def test_breadcrumbs_rescale_restores_the_l1_norm():
    # delta 1..10, density 0.5, gamma 0.1: drop the top 1 and bottom 4 -> keep 5..9 (sum 35),
    # L1 55 / 35; weight 0.5 on top
    delta = [float(i) for i in range(1, 11)]
    kept = [0.0] * 4 + [float(i) for i in range(5, 10)] + [0.0]
    for name in ("breadcrumbs", "breadcrumbs_ties"):
        out = merge(name, [delta], base=[0.0] * 10, weight=[0.5], density=[0.5], gamma=[0.1], rescale=True)
        assert_close(out, [0.5 * v * 55 / 35 for v in kept])
        out = merge(name, [delta], base=[0.0] * 10, weight=[0.5], density=[0.5], gamma=[0.1])
        assert_close(out, [0.5 * v for v in kept])


def test_task_arithmetic_accepts_rescale_which_changes_nothing():
    for rescale in (False, True):
        out = merge("task_arithmetic", [[2.0, 3.0], [0.0, 1.0]], base=[1.0, 1.0], weight=[1.0, 0.5],
                    rescale=rescale)
        assert_close(out, [1.5, 3.0])


# ---- nuslerp --------------------------------------------------------------------------------

def test_nuslerp_row_wise_flag_slerps_columns_as_mergekit_code_does():
    # a = [[1, 0], [1, 1]], b = [[0, 1], [1, 0]], weights 1:1 -> t = 0.5.
    # 90 degrees: midpoint = h*(a + b); 45 degrees: sin(22.5)/sin(45) * (a + b) = k*(a + b)
    a, b = [[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]
    k = math.sin(math.radians(22.5)) / math.sin(math.radians(45))
    rows = [[H, H], [2 * k, k]]  # row 0 at 90 degrees, row 1 at 45
    cols = [[k, H], [2 * k, H]]  # column 0 ([1, 1] vs [0, 1]) at 45 degrees, column 1 at 90
    assert_close(merge("nuslerp", [a, b], weight=[1.0, 1.0], nuslerp_flatten=False), rows)
    assert_close(merge("nuslerp", [a, b], weight=[1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True), cols)


def test_nuslerp_weights_summing_to_zero_take_the_midpoint():
    assert_close(merge("nuslerp", [[1.0, 0.0], [0.0, 1.0]], weight=[1.0, -1.0]), [H, H])


def test_nuslerp_with_base_slerps_task_vectors():
    # task vectors [1, 0] and [0, 2], t = 3 / 4 -> 67.5 degrees: sin(22.5) [1, 0] + sin(67.5) [0, 2]
    s1, s3 = math.sin(math.radians(22.5)), math.sin(math.radians(67.5))
    out = merge("nuslerp", [[2.0, 1.0], [1.0, 3.0]], base=[1.0, 1.0], weight=[1.0, 3.0])
    assert_close(out, [1.0 + s1, 1.0 + 2 * s3])


# ---- slerp ----------------------------------------------------------------------------------

def test_slerp_t_outside_0_1_extrapolates_along_the_great_circle():
    # base [1, 0], other [0, 1]: t = 1.5 goes to 135 degrees, t = -0.5 to -45 degrees
    assert_close(merge("slerp", [[0.0, 1.0]], base=[1.0, 0.0], t=1.5), [-H, H])
    assert_close(merge("slerp", [[0.0, 1.0]], base=[1.0, 0.0], t=-0.5), [H, -H])


# ---- model_stock ----------------------------------------------------------------------------

def test_model_stock_keeps_the_base_where_the_ratio_is_singular():
    # three task vectors 120 degrees apart: mean cos = -1/2, 1 + (3 - 1) cos = 0 -> t = 0 (base),
    # although the average task vector [1/3, 0] is not zero
    c, s = -0.5, math.sqrt(0.75)
    base = [0.5, 0.25]
    xs = [[0.5 + 2.0, 0.25], [0.5 + c, 0.25 + s], [0.5 + c, 0.25 - s]]
    assert_close(merge("model_stock", xs, base=base), base)


def test_model_stock_filter_wise_uses_last_dim_vectors():
    # [1, 2, 2] tensors: one cos per last-dim vector. Vector 0: task vectors [1, 0], [1, 0]
    # (cos 1 -> t = 1: the average); vector 1: [1, 0], [0, 1] (cos 0 -> t = 0: the base)
    base = torch.zeros(1, 2, 2)
    x1 = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    x2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    out = get_method("model_stock")([x1, x2], base, filter_wise=True)
    assert_close(out, torch.tensor([[[1.0, 0.0], [0.0, 0.0]]]))


# ---- arcee_fusion, ram, ramplus_tl ------------------------------------------------------------

def sparse_task_vectors(seed: int, shape, n: int = 3):
    """base and n models whose task vectors are sparse (about 40% of entries) and overlap, plus a few
    large outliers in the first: every branch of the three methods has entries to work on."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    xs = []
    for k in range(n):
        d = torch.randn(shape, generator=g) * 0.05 * (torch.rand(shape, generator=g) < 0.4)
        if k == 0:
            d = d + (torch.rand(shape, generator=g) < 0.05) * torch.randn(shape, generator=g)
        xs.append(base + d)
    return base, xs


def mergekit_arcee_fusion(base: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """mergekit 0.1.5 arcee_fusion (<= 1M entries), restated."""
    diff = (x - base).abs()
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    importance = diff * torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    ordered, _ = torch.sort(importance.reshape(-1))
    q1, median, q3 = ordered[(torch.tensor([0.25, 0.5, 0.75]) * (ordered.numel() - 1)).long()]
    mask = (importance >= median + 1.5 * (q3 - q1)).float()
    return base + (x - base) * mask


def mergekit_ram(base: torch.Tensor, xs, epsilon: float, plus: tuple[float, float] | None = None) -> torch.Tensor:
    """mergekit 0.1.5 ram / ramplus_tl (plus = (r, alpha)), restated."""
    tv = torch.stack([x - base for x in xs]).view(len(xs), -1)
    nonzero = tv.abs() > epsilon
    counts = nonzero.sum(dim=0, keepdim=True)
    overlap, unique = counts > 1, counts == 1
    lam = torch.ones(len(xs))
    if plus is not None:
        r, alpha = plus
        rho = (nonzero & overlap).sum(dim=1) / (nonzero & unique).sum(dim=1).clamp(min=epsilon)
        lam = 1 + r * rho.clamp(min=0, max=alpha)
    tv_z = tv * nonzero
    merged = (tv_z * unique * lam.unsqueeze(-1) + tv_z * overlap / counts.clamp(min=1)).sum(dim=0, keepdim=True)
    return base + merged.reshape_as(base)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("shape", [(1,), (7,), (300,), (64, 48), (16, 8, 4)])
def test_arcee_fusion_and_ram_are_bit_identical_to_mergekit(seed, shape):
    # float32 and at most 4 models (torch's sum over a stack of up to 4 adds in order): the same bits
    base, xs = sparse_task_vectors(seed, shape)
    assert torch.equal(get_method("arcee_fusion")([xs[0]], base), mergekit_arcee_fusion(base, xs[0]))
    for epsilon in (1e-5, 0.02):
        assert torch.equal(get_method("ram")(xs, base, epsilon=epsilon), mergekit_ram(base, xs, epsilon))
    for r, alpha, epsilon in ((0.1, 0.2, 1e-5), (0.7, 0.9, 0.01), (2.0, 5.0, 0.03)):
        assert torch.equal(get_method("ramplus_tl")(xs, base, r=r, alpha=alpha, epsilon=epsilon),
                           mergekit_ram(base, xs, epsilon, (r, alpha)))


def test_ramplus_tl_model_without_unique_entries_and_without_shared_entries():
    # d1 = [1, 1, 0], d2 = [1, 1, 2]: model 1 has 2 shared, 0 unique -> rho = 2 / epsilon, capped at alpha
    # (no unique entry to scale); model 2 has 2 shared, 1 unique -> rho 2 -> lambda 1 + 0.5 * min(2, 3) = 2
    out = merge("ramplus_tl", [[1.0, 1.0, 0.0], [1.0, 1.0, 2.0]], base=[0.0] * 3, r=0.5, alpha=3.0)
    assert_close(out, [1.0, 1.0, 4.0])
    # one model alone: nothing shared, rho 0, lambda 1 whatever r and alpha
    assert_close(merge("ramplus_tl", [[1.0, -2.0]], base=[0.0, 0.0], r=5.0, alpha=5.0), [1.0, -2.0])


def test_arcee_fusion_above_1m_entries_samples_the_quartiles_with_the_seeded_generator():
    # |delta| = e^u, u evenly over [0, 4): exact quartiles e^1, e^2, e^3, fence e^2 + 1.5 (e^3 - e) = 33.5
    # = e^3.51, so the top (4 - 3.51) / 4 = 12.2% are taken; 1M draws move the fence by a few entries.
    n = 1_200_000
    base = torch.zeros(n)
    x = torch.exp(torch.arange(n, dtype=torch.float32) * (4.0 / n))
    fuse = get_method("arcee_fusion")
    out = fuse([x], base, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, fuse([x], base, generator=torch.Generator().manual_seed(1)))  # same seed, same
    assert torch.equal(fuse([x], base), fuse([x], base, generator=torch.Generator().manual_seed(0)))  # default 0
    taken = out != 0
    assert torch.all(out[taken] == x[taken])
    first = int(torch.nonzero(taken)[0])
    assert torch.all(taken[first:])  # the largest entries, contiguous: the fence cuts once
    fence_u = math.log(math.exp(2) + 1.5 * (math.exp(3) - math.exp(1)))
    assert abs(first / n * 4.0 - fence_u) < 0.01
    other = fuse([x], base, generator=torch.Generator().manual_seed(2))
    assert 0 < int((other != out).sum()) < n // 1000  # another draw: a few entries near the fence


# ---- schema strictness ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["multislerp", "nuslerp"])
def test_spherical_means_require_weight(method):
    with pytest.raises(RecipeError, match=rf"models\[0\].parameters.weight: required by {method}"):
        parse_recipe({"merge_method": method, "models": [{"model": "a"}, {"model": "b"}]})


def test_slerp_accepts_t_outside_0_1():
    cfg = parse_recipe({"merge_method": "slerp", "base_model": "a", "models": [{"model": "a"}, {"model": "b"}],
                        "parameters": {"t": 1.5}})
    assert cfg.parameters["t"] == 1.5


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "task_arithmetic"])
def test_rescale_is_a_parameter_like_in_mergekit(method):
    spec = get_method(method)
    assert spec.param("rescale") is not None and spec.param("rescale").default is False
    parse_recipe({"merge_method": method, "base_model": "a", "models": [{"model": "b"}],
                  "parameters": {"weight": 1.0, "rescale": True}})


# ---- defaults live once, in the spec -------------------------------------------------------

@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_method_functions_declare_no_defaults_of_their_own(name):
    spec = REGISTRY[name]
    params = inspect.signature(spec.fn).parameters
    keywords = [p for p in params.values() if p.kind == p.KEYWORD_ONLY]
    assert all(p.default is inspect.Parameter.empty for p in keywords), name
    assert {p.name for p in keywords} == {"generator"} | {p.name.replace("lambda", "lambda_") for p in spec.params}


def test_calling_a_spec_fills_its_defaults():
    # ties defaults: density 1, normalize true, lambda 1 -> disjoint mean of [3, -1] and [1, 1]
    out = get_method("ties")([t([4.0, 0.0]), t([2.0, 2.0])], t([1.0, 1.0]), weight=[1.0, 1.0])
    assert_close(out, [1.0 + 2.0, 1.0 + 1.0])
    with pytest.raises(TypeError, match="'weight' is required"):
        get_method("ties")([t([4.0, 0.0])], t([1.0, 1.0]))


# ---- built-in chat templates ----------------------------------------------------------------

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}]


def render(name: str) -> str:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(CHAT_TEMPLATES[name]).render(messages=MESSAGES, bos_token="<s>", eos_token="</s>",
                                                        add_generation_prompt=True)


def test_builtin_chat_templates_include_mergekits_llama3_mistral_exaone():
    assert set(CHAT_TEMPLATES) == {"chatml", "alpaca", "llama3", "mistral", "exaone"}
    header = "<|start_header_id|>{}<|end_header_id|>\n\n"
    assert render("llama3") == ("<s>" + header.format("system") + "Be brief.<|eot_id|>\n"
                                + header.format("user") + "Hi<|eot_id|>\n"
                                + header.format("assistant") + "Hello<|eot_id|>\n"
                                + header.format("user") + "2+2?<|eot_id|>\n"
                                + header.format("assistant"))
    assert render("mistral") == "<s> [INST] Be brief.\n\nHi [/INST] Hello</s> [INST] 2+2? [/INST]"
    exaone = render("exaone")
    for piece in ("[|system|]Be brief.", "[|user|]Hi", "[|assistant|]Hello", "[|endofturn|]", "[|user|]2+2?"):
        assert piece in exaone
    assert exaone.rstrip().endswith("[|assistant|]")
    assert render("chatml").endswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")
