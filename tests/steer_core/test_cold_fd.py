"""COLD-FD on tiny random models: exactness of the JVP, fd against jvp, compression, blends, gradients
restricted to theta_<=L, the one extra pass, profiles, bad input."""

from __future__ import annotations

import pytest
import torch
from support import make_tiny, residual_after, tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.pytorch_utils import Conv1D

from steer_core import ConstantShift, Profile, apply, build_profile, compose, intervention
from steer_core import cold_fd as cf
from steer_core.cold import block_of, block_parameters, sample_gradients
from steer_core.data import make_item
from steer_core.errors import SteerError
from steer_core.models import wrap
from steer_core.prompts import encode_items

ITEMS = [make_item(f"Do you enjoy {w}?", ["Yes", "Somewhat", "No"], answer=i % 3)
         for i, w in enumerate(["cats", "dogs", "rain", "tea", "math", "art", "sports", "news"])]
OTHER = [make_item(f"Should the city fund {w}?", ["Strongly agree", "Agree", "Disagree"], target=[0.2, 0.5, 0.3])
         for w in ["parks", "buses", "libraries", "museums"]]
PROMPTS = [make_item("Is winter your favourite season?", ["Yes", "No"], answer=0),
           make_item("How much do you trust the news?", ["A lot", "Some", "Not at all"], answer=2)]


def fitted(lm, items=ITEMS, layer=2, strength=0.3, **params):
    profile = cf.fit(lm, items, [layer], cf.check_params({"storage": "float32", **params}), "prompt")[layer]
    profile.strength = strength
    return profile


def observed_shift(lm, steering, items=PROMPTS, layer=2):
    """What steering adds to the residual stream after block `layer`, with the real hooks on a real
    forward; and the mask of real positions."""
    batch = encode_items(lm, items)
    shift = residual_after(lm, batch, layer, steering) - residual_after(lm, batch, layer)
    return shift, batch["attention_mask"].bool()


def materialized(lm, pert, h):
    """Every parameter of theta_<=L moved by h * pert, as real tensors (the test oracle)."""
    params = dict(lm.model.named_parameters())
    modules = dict(lm.model.named_modules())
    emb = lm.model.get_input_embeddings().weight
    emb_name = next(n for n, p in params.items() if p is emb)
    out = {emb_name: emb.detach().clone().index_add(0, pert.embedding_index, h * pert.embedding_rows.to(emb.dtype))}
    for path, side in pert.sides.items():
        d = torch.zeros_like(modules[path].weight.T if isinstance(modules[path], Conv1D) else modules[path].weight)
        if side.U is not None:
            d = d + (side.U @ side.V.T).to(d.dtype)
        if side.dense is not None:
            d = d + side.dense.to(d.dtype)
        w = modules[path].weight
        out[f"{path}.weight"] = w + h * (d.T if isinstance(modules[path], Conv1D) else d)
        if side.bias is not None:
            out[f"{path}.bias"] = modules[path].bias + h * side.bias.to(w.dtype)
    for path, d in pert.params.items():
        out[path] = params[path] + h * d.to(params[path].dtype)
    return out


# LayerNorm models run wholly in float64, so the central difference is exact to ~h^2; the RMSNorm
# families compute their norms in fp32 whatever the model dtype, which limits any finite difference to
# about 1e-5 to 1e-4 (the best h trades that rounding against the h^2 term); a wrong scale or orientation
# of any part would be off by O(1).
FLOAT64_CASES = [("gpt2", 1e-4, 1e-8), ("gpt_neox", 1e-4, 1e-8), ("llama", 1e-2, 1e-3), ("gemma", 1e-2, 1e-3),
                 ("qwen2", 1e-2, 1e-3)]


@pytest.mark.parametrize(("family", "h", "tolerance"), FLOAT64_CASES)
def test_jvp_equals_a_float64_finite_difference_of_the_real_parameters(family, h, tolerance):
    """The served displacement equals (Z_L(theta + h d) - Z_L(theta - h d)) / 2h with the model's own
    parameters really moved (embedding rows, Linear/Conv1D weights, biases, norm gains), in float64."""
    lm = make_tiny(family, seed=1)
    lm.model.double()
    profile = fitted(lm, layer=2, strength=0.3, mode="jvp", rank=4)
    iv = intervention(profile, lm)
    shift, mask = observed_shift(lm, [iv])
    pert = iv.perturbation.scaled(iv.coef)  # built on the model's device in its (float64) dtype
    batch = encode_items(lm, PROMPTS)
    with torch.no_grad():
        z = {}
        for sign in (1, -1):
            state = materialized(lm, pert, sign * h)
            out = torch.func.functional_call(lm.model, state, (), {**batch, "output_hidden_states": True,
                                                                   "use_cache": False})
            z[sign] = out.hidden_states[3]
    expected = (z[1] - z[-1]) / (2 * h)
    assert expected[mask].norm() > 0
    error = (shift[mask] - expected[mask]).abs().max() / expected[mask].abs().max()
    assert error < tolerance


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma", "qwen2", "gpt_neox", "mistral"])
def test_fd_agrees_with_jvp_in_fp32(family):
    lm = make_tiny(family, seed=2)
    profile = fitted(lm, layer=2, strength=0.3, rank=4)
    shifts = {}
    for mode in ("fd", "jvp"):
        profile.params["mode"] = mode
        shifts[mode], mask = observed_shift(lm, [intervention(profile, lm)])
    a, b = shifts["fd"][mask].flatten(), shifts["jvp"][mask].flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999
    assert (a.norm() / b.norm()).item() == pytest.approx(1.0, abs=0.01)


def test_fd_runs_its_perturbed_pass_in_fp32_for_a_bf16_model():
    """In bf16 a step of eps would round away; the fd pass runs in fp32 and matches the exact JVP of the
    same (bf16-rounded) weights."""
    reference = make_tiny("llama", seed=3)
    served = make_tiny("llama", seed=3)
    served.model.to(torch.bfloat16)
    reference.model.load_state_dict({k: v.float() for k, v in served.model.state_dict().items()})
    profile = fitted(reference, layer=2, strength=0.3, rank=4)  # same fingerprint: bf16-rounded weights
    profile.params["mode"] = "fd"
    fd = intervention(profile, served)
    profile.params["mode"] = "jvp"
    exact = intervention(profile, reference)
    batch = encode_items(served, PROMPTS)
    rows = torch.arange(len(PROMPTS))
    got = {}
    for lm, iv in ((served, fd), (reference, exact)):
        kept: list = []
        handle = lm.blocks[2].register_forward_hook(lambda m, a, out, kept=kept: kept.append(out))
        try:
            with torch.no_grad(), apply(lm, [iv]) as hooks:
                lm.model(**batch, use_cache=False)
                got[lm.name + str(lm.dtype)] = iv.displacement(kept[0], hooks.ctx, rows).float()
        finally:
            handle.remove()
    mask = batch["attention_mask"].bool()
    a, b = (v[mask].flatten() for v in got.values())
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99


def square_tiny():
    """A tiny llama whose every weight matrix has min dimension 64, so one rank is full rank for all."""
    tok = tiny_tokenizer()
    torch.manual_seed(4)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512)
    return wrap(LlamaForCausalLM(config).float().eval(), tok, "tiny-square")


def test_compressed_at_full_rank_equals_uncompressed():
    lm = square_tiny()
    full = fitted(lm, rank=None, mode="jvp")
    compressed = fitted(lm, rank=64, mode="jvp")
    assert compressed.params["compression"]["fidelity"] == pytest.approx(1.0, abs=1e-5)
    assert compressed.params["unit_scale"] == pytest.approx(full.params["unit_scale"], rel=1e-4)
    a, mask = observed_shift(lm, [intervention(full, lm)])
    b, _ = observed_shift(lm, [intervention(compressed, lm)])
    torch.testing.assert_close(b[mask], a[mask], rtol=1e-3, atol=1e-4 * a[mask].abs().max().item())
    # And the factors themselves reproduce each matrix.
    grads = sample_gradients(lm, ITEMS, param_layer=2)
    dense = cf.Perturbation.descent(lm, grads)
    for path, side in dense.compress(64).sides.items():
        torch.testing.assert_close(side.U @ side.V.T, dense.sides[path].dense, rtol=1e-4, atol=1e-7)


def test_low_rank_profile_is_small_and_faithful(tiny_lm):
    profile = fitted(tiny_lm, rank=4, storage="bfloat16")
    c = profile.params["compression"]
    assert c["bytes"] == profile.nbytes() < c["uncompressed_bytes"] / 10
    assert 0.9 < c["fidelity"] <= 1.0 + 1e-6 and c["rank"] == 4
    assert profile.tensors["side:model.layers.0.self_attn.q_proj:U"].dtype == torch.bfloat16


def test_blend_of_two_profiles_is_the_weighted_sum_and_one_extra_pass(tiny_lm):
    a = intervention(fitted(tiny_lm, ITEMS, mode="jvp"), tiny_lm)
    b = intervention(fitted(tiny_lm, OTHER, mode="jvp"), tiny_lm)
    da, mask = observed_shift(tiny_lm, [a])
    db, _ = observed_shift(tiny_lm, [b])
    row = compose([(a, 0.7), (b, -0.4)])
    assert len(row) == 1 and isinstance(row[0], cf.ColdFDShift)
    mixed, _ = observed_shift(tiny_lm, row)
    expected = 0.7 * da - 0.4 * db
    torch.testing.assert_close(mixed[mask], expected[mask], rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    zero, _ = observed_shift(tiny_lm, compose([(a, 0.0), (b, 0.0)]))
    assert zero.abs().max() == 0

    # fd: still linear, and the blend of both costs one pass through blocks 0..L.
    fa = intervention(fitted(tiny_lm, ITEMS, mode="fd"), tiny_lm)
    fb = intervention(fitted(tiny_lm, OTHER, mode="fd"), tiny_lm)
    calls = []
    handle = tiny_lm.blocks[0].mlp.register_forward_hook(lambda *args: calls.append(1))
    try:
        fd_mixed, _ = observed_shift(tiny_lm, compose([(fa, 0.7), (fb, -0.4)]))
    finally:
        handle.remove()
    assert len(calls) == 3  # unsteered forward, steered forward, one extra pass
    cos = torch.nn.functional.cosine_similarity(fd_mixed[mask].flatten(), expected[mask].flatten(), dim=0)
    assert cos > 0.999


def test_mixes_with_constant_vectors_in_one_request(tiny_lm):
    cold = intervention(fitted(tiny_lm, mode="fd"), tiny_lm)
    vector = torch.randn(tiny_lm.hidden_size)
    same_layer = ConstantShift(layer=2, positions="prompt", vector=vector)
    d_cold, mask = observed_shift(tiny_lm, [cold])
    both, _ = observed_shift(tiny_lm, compose([(cold, 1.0), (same_layer, 1.0)]))
    torch.testing.assert_close(both[mask], (d_cold + vector)[mask], rtol=1e-4, atol=1e-4)

    # Steering below L changes Z_L, so fd cannot take the served Z_L as its unperturbed term: it must agree
    # with the exact JVP (which never reads the served Z_L) all the same.
    below = ConstantShift(layer=1, positions="prompt", vector=vector)
    cold_jvp = intervention(fitted(tiny_lm, mode="jvp"), tiny_lm)
    with_fd, _ = observed_shift(tiny_lm, [below, cold])
    with_jvp, _ = observed_shift(tiny_lm, [below, cold_jvp])
    cos = torch.nn.functional.cosine_similarity(with_fd[mask].flatten(), with_jvp[mask].flatten(), dim=0)
    assert cos > 0.999


def test_gradients_touch_no_parameter_above_L():
    lm = make_tiny("llama", seed=5)
    lm.blocks[3].mlp.down_proj.weight.requires_grad_(False)  # flags must come back as they were
    flags = {n: p.requires_grad for n, p in lm.model.named_parameters()}
    grads = sample_gradients(lm, ITEMS, param_layer=1)
    assert set(grads.param_grads) == set(block_parameters(lm, 1))
    assert all(block_of(lm, path) <= 1 for path in grads.param_grads)
    assert all(p.grad is None for p in lm.model.parameters())
    assert flags == {n: p.requires_grad for n, p in lm.model.named_parameters()}
    batch = encode_items(lm, ITEMS)  # row-sparse: exactly the tokens at the sample's real positions
    assert set(grads.embedding_index.tolist()) == set(batch["input_ids"][batch["attention_mask"].bool()].tolist())
    profile = fitted(lm, layer=1)
    paths = [k.split(":")[1] for k in profile.tensors if k.startswith(("side:", "param:"))]
    assert paths and all(block_of(lm, p) <= 1 for p in paths)


def test_profile_round_trip(tiny_lm, tmp_path):
    profile = fitted(tiny_lm, rank=4, storage="bfloat16")
    loaded = Profile.load(profile.save(tmp_path / "p.safetensors"), tiny_lm)
    assert loaded.params == profile.params and set(loaded.tensors) == set(profile.tensors)
    before, mask = observed_shift(tiny_lm, [intervention(profile, tiny_lm)])
    after, _ = observed_shift(tiny_lm, [intervention(loaded, tiny_lm)])
    torch.testing.assert_close(after[mask], before[mask])


def test_generation_with_and_without_kv_cache_agree(tiny_lm):
    """The extra pass neither reads nor writes the served KV cache; decode steps are not steered."""
    iv = intervention(fitted(tiny_lm, mode="fd", strength=2.0), tiny_lm)
    batch = encode_items(tiny_lm, PROMPTS)
    prompt_length = batch["input_ids"].shape[1]
    out = {}
    for cache in (True, False):
        with torch.no_grad(), apply(tiny_lm, [iv], prompt_length=prompt_length):
            out[cache] = tiny_lm.model.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=cache,
                                                pad_token_id=tiny_lm.tokenizer.pad_token_id)
    with torch.no_grad():
        plain = tiny_lm.model.generate(**batch, max_new_tokens=6, do_sample=False,
                                       pad_token_id=tiny_lm.tokenizer.pad_token_id)
    assert torch.equal(out[True], out[False])
    assert not torch.equal(out[True], plain)


def test_build_profile_searches_and_records_compression(tiny_lm):
    profile = build_profile(tiny_lm, ITEMS + OTHER, "cold_fd", {"rank": 4})
    assert profile.method == "cold_fd" and profile.positions == "prompt"
    assert profile.strength in [0.0, *cf.STRENGTHS]
    c = profile.params["compression"]
    assert {"rank", "bytes", "uncompressed_bytes", "fidelity"} <= set(c)
    assert len(profile.metrics["search"]) == len(cf.STRENGTHS) * len(cf.candidate_layers(tiny_lm))


def test_bad_input_names_the_field(tiny_lm):
    cases = [({"rank": 33}, "params.rank"), ({"rank": 0}, "params.rank"), ({"eps": 0}, "params.eps"),
             ({"eps": -1e-3}, "params.eps"), ({"eps": float("nan")}, "params.eps"), ({"mode": "exact"}, "params.mode"),
             ({"positions": "last"}, "params.positions"), ({"strength": -0.1}, "params.strength"),
             ({"warp": 1}, "params.warp")]
    for params, field in cases:
        with pytest.raises(SteerError) as info:
            build_profile(tiny_lm, ITEMS, "cold_fd", {"layer": 2, "strength": 0.1, **params})
        assert info.value.field == field, params
    with pytest.raises(SteerError, match="k_proj"):
        build_profile(tiny_lm, ITEMS, "cold_fd", {"layer": 2, "strength": 0.1, "rank": 33})
    with pytest.raises(SteerError, match="too few") as info:
        build_profile(tiny_lm, ITEMS[:3], "cold_fd")
    assert info.value.field == "items"


def test_nan_gradients_fail_the_build_and_write_nothing():
    lm = make_tiny("llama", seed=6)
    with torch.no_grad():
        lm.model.model.norm.weight[0] = float("nan")
    with pytest.raises(SteerError, match="NaN") as info:
        build_profile(lm, ITEMS, "cold_fd", {"layer": 1, "strength": 0.1})
    assert info.value.field == "items"


def test_strengths_of_one_profile_share_one_extra_pass(tiny_lm):
    """dZ is linear in the strength: the held-out search scores several strengths with one extra pass."""
    profile = fitted(tiny_lm, mode="fd", strength=0.1)
    first, mask = observed_shift(tiny_lm, [intervention(profile, tiny_lm)])
    profile.strength = 0.25
    calls = []
    handle = tiny_lm.blocks[0].mlp.register_forward_hook(lambda *args: calls.append(1))
    try:
        second, _ = observed_shift(tiny_lm, [intervention(profile, tiny_lm)])
    finally:
        handle.remove()
    assert len(calls) == 2  # the unsteered and the steered forward: no extra pass
    torch.testing.assert_close(second[mask], 2.5 * first[mask], rtol=1e-4, atol=1e-6)
