"""ODESteer on toy data and the tiny random model: the field, the flow, profiles, generation, blends."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from support import FIXTURES, residual_after

from steer_core import build_profile, intervention, load_items
from steer_core.data import make_item
from steer_core.errors import ProfileError, SteerError
from steer_core.methods import get_method
from steer_core.odesteer import (
    Barrier,
    BarrierField,
    BarrierFlow,
    contrast_weights,
    fit,
    fit_barrier,
    integrate,
    strengths,
)
from steer_core.profile import Profile
from steer_core.prompts import answer_distributions, answer_distributions_under, encode
from steer_core.sketch import CountSketch
from steer_core.steering import ConstantShift, apply, compose

DIM = 16
LAYER = 2
PROMPTS = ["The weather today is", "A much longer prompt that needs some padding, it says"]
ITEMS = [make_item(f"Question number {i}?", ["Yes", "No", "Maybe"], answer=i % 3) for i in range(10)]
SMALL = {"n_components": 512}  # fast fits on the tiny model; the math is the same at 8000


def _toy(n: int = 40, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two separable clouds: positives lean along +e0, negatives along -e0 (norms around 5)."""
    g = torch.Generator().manual_seed(seed)
    shift = torch.zeros(DIM)
    shift[0] = 4.0
    pos = torch.randn(n, DIM, generator=g) + shift
    neg = torch.randn(n, DIM, generator=g) - shift
    return pos, neg


def _toy_barrier(degree: int = 2, seed: int = 0) -> Barrier:
    pos, neg = _toy(seed=seed)
    return fit_barrier(CountSketch.create(DIM, degree=degree, n_components=300, seed=seed), pos, neg)


def _autograd_grad(parts, a):
    leaf = a.clone().requires_grad_(True)
    sum(w * b.value(leaf) for b, w in parts).sum().backward()
    return leaf.grad


# ---------------------------------------------------------------------------------- field and flow

@pytest.mark.parametrize("degree", [1, 2, 3])
def test_field_gradient_equals_autograd_of_the_barrier(degree):
    barrier = _toy_barrier(degree)
    a = torch.randn(9, DIM) * 3
    field = BarrierField.build([(barrier, 1.0)], torch.device("cpu"))
    assert (field.quad is not None) == (degree == 2) and bool(field.spectral) == (degree == 3)
    expected = _autograd_grad([(barrier, 1.0)], a)
    torch.testing.assert_close(field.grad(a), expected, atol=1e-7, rtol=1e-4)
    torch.testing.assert_close(barrier.grad(a), expected, atol=1e-7, rtol=1e-4)


def test_blended_field_is_the_gradient_of_the_weighted_sum():
    parts = [(_toy_barrier(2, seed=0), 0.7), (_toy_barrier(2, seed=1), -0.2), (_toy_barrier(3, seed=2), 0.5),
             (_toy_barrier(3, seed=2), 0.25), (_toy_barrier(1, seed=3), 1.5)]
    field = BarrierField.build(parts, torch.device("cpu"))
    assert len(field.spectral) == 1  # the two degree-3 barriers share hashes: one FFT pass
    a = torch.randn(5, DIM) * 2
    torch.testing.assert_close(field.grad(a), _autograd_grad(parts, a), atol=1e-7, rtol=1e-4)


def test_field_has_unit_norm():
    field = BarrierField.build([(_toy_barrier(), 1.0)], torch.device("cpu"))
    a = torch.randn(50, DIM) * 7
    torch.testing.assert_close(field(a).norm(dim=1), torch.ones(50), atol=1e-5, rtol=0)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4"])
def test_barrier_increases_along_the_flow(solver):
    barrier = _toy_barrier()
    field = BarrierField.build([(barrier, 1.0)], torch.device("cpu"))
    _, neg = _toy(seed=5)  # fresh negatives, |a| about 5
    a = neg
    values = [barrier.value(a)]
    # A path of 6 turns them about 1.1 rad towards the positives, short of h's maximum on the sphere
    # (past it a fixed-step solver would jitter around the maximum).
    for _ in range(12):
        a = integrate(field, a, 0.5, solver, steps=5)
        values.append(barrier.value(a))
    values = torch.stack(values)
    assert (values[1:] > values[:-1]).all()
    assert (values[0] < 0).all() and (values[-1] > 0).float().mean() > 0.5


def test_one_euler_step_is_a_plus_t_f():
    field = BarrierField.build([(_toy_barrier(), 1.0)], torch.device("cpu"))
    a = torch.randn(4, DIM) * 3
    torch.testing.assert_close(integrate(field, a, 2.5, "euler", steps=1), a + 2.5 * field(a), atol=0, rtol=0)


def test_higher_order_solvers_converge_faster():
    field = BarrierField.build([(_toy_barrier(), 1.0)], torch.device("cpu"))
    a = torch.randn(4, DIM, dtype=torch.float32) * 3
    exact = integrate(field, a, 3.0, "euler", steps=1000)
    errors = {s: (integrate(field, a, 3.0, s, steps=6) - exact).norm() for s in ("euler", "midpoint", "rk4")}
    assert errors["rk4"] < errors["midpoint"] < errors["euler"]
    # path length: a unit field moves a point at most T
    assert ((integrate(field, a, 3.0, "rk4", steps=6) - a).norm(dim=1) <= 3.0 + 1e-4).all()


# ---------------------------------------------------------------------------------- fit on the tiny model

def test_contrast_weights_put_the_target_against_the_others():
    target = torch.tensor([[0.5, 0.25, 0.25, 0.0], [1.0, 0.0, 0.0, 0.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True]])
    pos, neg = contrast_weights(target, valid)
    torch.testing.assert_close(pos, target)
    torch.testing.assert_close(neg, torch.tensor([[0.25, 0.375, 0.375, 0.0], [0.0, 1 / 3, 1 / 3, 1 / 3]]))
    assert torch.allclose(pos.sum(1), neg.sum(1))  # class prior 1/2 whatever K is


def test_fit_makes_one_profile_per_layer_with_the_norm_scaled_grid(tiny_lm):
    params = get_method("odesteer").check_params(dict(SMALL))
    profiles = fit(tiny_lm, ITEMS, [1, 2], params, "last")
    assert set(profiles) == {1, 2}
    p = profiles[2]
    assert p.method == "odesteer" and p.positions == "last" and p.strength == 1.0
    assert p.tensors["coef"].shape == (512,) and p.tensors["index_hash"].shape == (2, tiny_lm.hidden_size + 1)
    assert p.params["steps"] == 10 and p.params["solver"] == "euler"
    grid = strengths(p, tiny_lm)
    assert len(grid) >= 3 and all(t > 0 for t in grid) and grid == sorted(grid)
    # T is a path length in activation space: the grid follows the layer's activation norm
    wider = Profile(**{**p.__dict__, "tensors": {**p.tensors, "activation_norm": 2 * p.tensors["activation_norm"]}})
    assert strengths(wider, tiny_lm) == pytest.approx([2 * t for t in grid], rel=1e-5)
    assert not torch.equal(profiles[1].tensors["coef"], profiles[2].tensors["coef"])


def test_profile_round_trips_through_safetensors(tiny_lm, tmp_path):
    params = get_method("odesteer").check_params({**SMALL, "solver": "rk4", "steps": 3})
    profile = fit(tiny_lm, ITEMS, [LAYER], params, "last")[LAYER]
    profile.strength = 0.2 * float(profile.tensors["activation_norm"])
    back = Profile.load(profile.save(tmp_path / "ode.safetensors"), tiny_lm)
    assert back.params == profile.params and back.strength == profile.strength
    for name, t in profile.tensors.items():
        assert torch.equal(back.tensors[name], t), name
    a = torch.randn(3, tiny_lm.hidden_size)
    one, two = intervention(profile, tiny_lm), intervention(back, tiny_lm)
    assert two.solver == "rk4" and two.steps == 3
    torch.testing.assert_close(two.steer(a), one.steer(a), atol=0, rtol=0)


def test_steers_only_the_last_position_by_its_own_state(tiny_lm):
    profile = fit(tiny_lm, ITEMS, [LAYER], get_method("odesteer").check_params(dict(SMALL)), "last")[LAYER]
    profile.strength = 0.3 * float(profile.tensors["activation_norm"])
    flow = intervention(profile, tiny_lm)
    batch = encode(tiny_lm, PROMPTS)
    base = residual_after(tiny_lm, batch, LAYER)
    delta = residual_after(tiny_lm, batch, LAYER, [[flow]] * 2) - base
    assert torch.equal(delta[:, :-1], torch.zeros_like(delta[:, :-1]))
    expected = flow.steer(base[:, -1]) - base[:, -1]
    torch.testing.assert_close(delta[:, -1], expected, atol=1e-5, rtol=1e-4)
    # path length T along a unit field: the move is at most T and, for a smooth field, close to it
    moved = delta[:, -1].norm(dim=1)
    assert (moved <= profile.strength * (1 + 1e-4)).all() and (moved > 0.5 * profile.strength).all()


def test_each_row_gets_its_own_t(tiny_lm):
    profile = fit(tiny_lm, ITEMS, [LAYER], get_method("odesteer").check_params(dict(SMALL)), "last")[LAYER]
    norm = float(profile.tensors["activation_norm"])
    profile.strength = 0.1 * norm
    short = intervention(profile, tiny_lm)
    profile.strength = 0.4 * norm
    long = intervention(profile, tiny_lm)
    batch = encode(tiny_lm, PROMPTS)
    with torch.no_grad():
        with apply(tiny_lm, [[short], [long]]):
            mixed = tiny_lm.model(**batch).logits
        with apply(tiny_lm, [[short], None]):
            only_short = tiny_lm.model(**batch).logits
        with apply(tiny_lm, [None, [long]]):
            only_long = tiny_lm.model(**batch).logits
        plain = tiny_lm.model(**batch).logits
    torch.testing.assert_close(mixed[0], only_short[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed[1], only_long[1], atol=1e-5, rtol=1e-5)
    assert torch.equal(only_short[1], plain[1]) and not torch.allclose(mixed[1], plain[1])


@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_generate_with_and_without_kv_cache_steers_the_same_tokens(tiny_lm, solver):
    params = get_method("odesteer").check_params({**SMALL, "solver": solver, "steps": 4})
    profile = fit(tiny_lm, ITEMS, [LAYER], params, "last")[LAYER]
    profile.strength = 0.5 * float(profile.tensors["activation_norm"])
    flow = intervention(profile, tiny_lm)
    batch = encode(tiny_lm, PROMPTS)
    n = batch["input_ids"].shape[1]
    kwargs = dict(max_new_tokens=8, do_sample=False, output_scores=True, return_dict_in_generate=True,
                  pad_token_id=tiny_lm.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = tiny_lm.model.generate(**batch, **kwargs)
        runs = {}
        for cache in (True, False):
            with apply(tiny_lm, [flow], prompt_length=n):
                runs[cache] = tiny_lm.model.generate(**batch, use_cache=cache, **kwargs)
    assert torch.equal(runs[True].sequences, runs[False].sequences)
    for with_cache, without in zip(runs[True].scores, runs[False].scores, strict=True):
        torch.testing.assert_close(with_cache, without, atol=1e-4, rtol=1e-4)
    # and the steering did something at every generated step, not only at the prompt
    assert all(not torch.allclose(s, p, atol=1e-4) for s, p in zip(runs[True].scores, plain.scores, strict=True))


# ---------------------------------------------------------------------------------- blends

@pytest.fixture(scope="module")
def two_flows(tiny_lm):
    params = get_method("odesteer").check_params(dict(SMALL))
    urban = load_items(FIXTURES / "opinions_group_urban.jsonl")[:8]
    rural = load_items(FIXTURES / "opinions_group_rural.jsonl")[:8]
    flows = []
    for items, rel in ((urban, 0.2), (rural, 0.3)):
        profile = fit(tiny_lm, items, [LAYER], params, "last")[LAYER]
        profile.strength = rel * float(profile.tensors["activation_norm"])
        flows.append(intervention(profile, tiny_lm))
    return flows


def test_flows_read_from_a_shared_prefix_as_each_reads_alone(tiny_lm, two_flows):
    """A build reads a fold under every path length from one pass of the blocks below the flow: the flows
    steer the last position of each stacked copy as they steer it read alone."""
    a, b = two_flows
    items = load_items(FIXTURES / "opinions_group_rural.jsonl")[8:12]
    steerings = [[a], None, [b], [BarrierFlow.blend([(a, 0.6), (b, 0.4)])]]
    read = answer_distributions_under(tiny_lm, items, steerings)
    for steering, dists in zip(steerings, read, strict=True):
        for item, d in zip(items, dists, strict=True):
            np.testing.assert_allclose(d, answer_distributions(tiny_lm, [item], steering)[0], atol=2e-5)
    assert not np.allclose(read[0][0], read[1][0], atol=1e-4)


def test_blend_is_one_flow_on_the_weighted_barrier(two_flows):
    a, b = two_flows
    blend = BarrierFlow.blend([(a, 0.6), (b, 0.4)])
    assert math.isclose(blend.path_length, 0.6 * a.path_length + 0.4 * b.path_length)
    x = torch.randn(3, a.parts[0][0].sketch.dim) * 5
    expected = 0.6 * a.parts[0][0].grad(x) + 0.4 * b.parts[0][0].grad(x)
    torch.testing.assert_close(blend.field.grad(x), expected, atol=1e-7, rtol=1e-4)
    # blends of blends flatten to the same barrier
    nested = BarrierFlow.blend([(BarrierFlow.blend([(a, 0.6)]), 1.0), (b, 0.4)])
    torch.testing.assert_close(nested.steer(x), blend.steer(x), atol=1e-6, rtol=1e-6)


def test_weight_scales_the_path_length_and_its_sign_the_direction(two_flows, tiny_lm):
    a, _ = two_flows
    x = torch.randn(3, tiny_lm.hidden_size, generator=torch.Generator().manual_seed(0)) * 5
    half = BarrierFlow.blend([(a, 0.5)])
    same_field_half_t = BarrierFlow(a.layer, a.positions, a.parts, a.path_length / 2, a.solver, a.steps)
    # The same steps on the same field; float32 rounding may differ in the last bits (seen: 2e-9).
    torch.testing.assert_close(half.steer(x), same_field_half_t.steer(x), atol=1e-6, rtol=1e-6)
    one_step = BarrierFlow(a.layer, a.positions, a.parts, a.path_length, "euler", 1)
    back = BarrierFlow.blend([(one_step, -2.0)])
    torch.testing.assert_close(back.steer(x) - x, -2.0 * (one_step.steer(x) - x), atol=1e-5, rtol=1e-5)


def test_all_zero_weights_give_exactly_zero_displacement(two_flows, tiny_lm):
    a, b = two_flows
    batch = encode(tiny_lm, PROMPTS)
    base = residual_after(tiny_lm, batch, LAYER)
    row = compose([(a, 0.0), (b, 0.0)])
    assert len(row) == 1 and row[0].path_length == 0 and row[0].field is None
    assert torch.equal(residual_after(tiny_lm, batch, LAYER, [row] * 2), base)
    shipped_nothing = BarrierFlow(a.layer, a.positions, a.parts, 0.0)
    assert torch.equal(residual_after(tiny_lm, batch, LAYER, [[shipped_nothing]] * 2), base)


def test_composes_with_a_constant_vector(two_flows, tiny_lm):
    a, _ = two_flows
    v = torch.randn(tiny_lm.hidden_size, generator=torch.Generator().manual_seed(3))
    shift = ConstantShift(LAYER, "prompt", v)
    batch = encode(tiny_lm, PROMPTS)
    base = residual_after(tiny_lm, batch, LAYER)
    row = compose([(a, 1.0), (shift, 0.5)])
    assert {type(iv) for iv in row} == {BarrierFlow, ConstantShift}
    both = residual_after(tiny_lm, batch, LAYER, [row] * 2) - base
    ode_only = residual_after(tiny_lm, batch, LAYER, [[a]] * 2) - base
    shift_only = residual_after(tiny_lm, batch, LAYER, [[ConstantShift(LAYER, "prompt", 0.5 * v)]] * 2) - base
    torch.testing.assert_close(both, ode_only + shift_only, atol=1e-5, rtol=1e-5)
    assert ode_only[:, -1].abs().sum() > 0 and shift_only[:, 0].abs().sum() > 0


# ---------------------------------------------------------------------------------- the shared search

def test_build_chooses_layer_and_t_on_held_out_items(tiny_lm):
    items = load_items(FIXTURES / "opinions_group_urban.jsonl")[:10]
    profile = build_profile(tiny_lm, items, "odesteer", dict(SMALL))
    m = profile.metrics
    assert profile.method == "odesteer" and profile.positions == "last"
    layers = get_method("odesteer").layers(tiny_lm)
    assert {row["layer"] for row in m["search"]} == set(layers)
    for layer in layers:  # a T grid per layer, from that layer's activation norm
        grid = [row["strength"] for row in m["search"] if row["layer"] == layer]
        assert len(set(grid)) >= 3 and min(grid) > 0
    tried = {row["strength"] for row in m["search"] if row["layer"] == profile.layer}
    assert profile.layer == m["choice"]["layer"]
    if m["steering_shipped"]:
        assert profile.strength in tried
    else:
        assert profile.strength == 0
    Profile.from_bytes(profile.to_bytes())


def test_cli_builds_and_evaluates_an_odesteer_profile(tiny_lm, tmp_path, capsys):
    from service.cli.main import main

    tiny_lm.model.save_pretrained(tmp_path / "tiny")
    tiny_lm.tokenizer.save_pretrained(tmp_path / "tiny")
    model, data, out = str(tmp_path / "tiny"), str(FIXTURES / "opinions_group_rural.jsonl"), tmp_path / "o.safetensors"
    assert main(["build", "--method", "odesteer", "--data", data, "--limit", "8", "--model", model, "--layer", "1",
                 "--strength", "0.5", "--param", "n_components=256", "--param", "solver=midpoint",
                 "--out", str(out)]) == 0
    profile = Profile.load(out)
    assert profile.method == "odesteer" and profile.positions == "last" and profile.strength == 0.5
    assert profile.params["solver"] == "midpoint" and profile.tensors["coef"].shape == (256,)
    capsys.readouterr()
    assert main(["eval", "--profile", str(out), "--data", data, "--offset", "8", "--limit", "4", "--model", model]) == 0
    table = capsys.readouterr().out
    assert "odesteer layer 1 strength 0.5" in table and "alignment" in table


# ---------------------------------------------------------------------------------- bad input

def test_uniform_targets_are_one_class(tiny_lm):
    uniform = [make_item(f"Q{i}?", ["a", "b", "c"], target=[1 / 3] * 3) for i in range(6)]
    with pytest.raises(SteerError, match="one class") as info:
        fit(tiny_lm, uniform, [1], get_method("odesteer").check_params({}), "last")
    assert info.value.field == "items"


def test_one_class_activations_are_rejected():
    pos, _ = _toy()
    sketch = CountSketch.create(DIM, n_components=64)
    with pytest.raises(SteerError, match="one class") as info:
        fit_barrier(sketch, pos, pos[:0])
    assert info.value.field == "items"
    with pytest.raises(SteerError, match="one class"):
        fit_barrier(sketch, pos, pos, neg_weight=torch.zeros(len(pos)))


@pytest.mark.parametrize(("params", "field"), [
    ({"degree": 0}, "params.degree"),
    ({"n_components": 1}, "params.n_components"),
    ({"steps": 0}, "params.steps"),
    ({"steps": 2.5}, "params.steps"),
    ({"solver": "heun"}, "params.solver"),
    ({"gamma": -1}, "params.gamma"),
    ({"T": 2.0}, "params.T"),
    ({"alpha": 1}, "params.alpha"),
    ({"strength": -1.0}, "params.strength"),
])
def test_bad_params_name_the_field(tiny_lm, params, field):
    with pytest.raises(SteerError) as info:
        build_profile(tiny_lm, ITEMS, "odesteer", params)
    assert info.value.field == field


def test_malformed_profiles_are_refused(tiny_lm):
    profile = fit(tiny_lm, ITEMS[:4], [LAYER], get_method("odesteer").check_params(dict(SMALL)), "last")[LAYER]
    broken = [
        {**profile.tensors, "coef": profile.tensors["coef"][:-1]},
        {k: v for k, v in profile.tensors.items() if k != "index_hash"},
        {**profile.tensors, "index_hash": profile.tensors["index_hash"] + 512},
        {**profile.tensors, "intercept": torch.zeros(3)},
    ]
    for tensors in broken:
        bad = Profile(**{**profile.__dict__, "tensors": tensors})
        with pytest.raises(ProfileError):
            intervention(bad, tiny_lm)
    with pytest.raises(ProfileError):
        intervention(Profile(**{**profile.__dict__, "params": {**profile.params, "steps": 0}}), tiny_lm)


def test_negative_t_is_rejected_by_the_intervention(two_flows):
    a, _ = two_flows
    with pytest.raises(SteerError) as info:
        BarrierFlow(a.layer, a.positions, a.parts, -1.0)
    assert info.value.field == "profile.strength"
    with pytest.raises(SteerError) as info:
        integrate(a.field, torch.zeros(1, 4), 1.0, "euler", steps=0)
    assert info.value.field == "params.steps"
