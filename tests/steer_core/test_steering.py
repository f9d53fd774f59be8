"""Steering mechanics on a tiny random model: exact displacements, per-row independence, KV cache."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from support import FIXTURES, make_tiny, residual_after

from steer_core.data import load_items
from steer_core.prompts import answer_distributions, by_length, encode, prompt_token_ids
from steer_core.steering import ConstantShift, ForwardContext, SteeringHooks, apply, compose, steers_in_chunks

PROMPTS = ["The weather today is", "A much longer prompt that needs no padding at all, it says"]
LAYER = 2


def _vector(lm, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(lm.hidden_size, generator=g)


@pytest.mark.parametrize("positions", ["prompt", "last", "all"])
def test_adds_exactly_the_displacement_at_the_steered_positions(tiny_lm, positions):
    batch = encode(tiny_lm, PROMPTS)
    v = _vector(tiny_lm, 1)
    base = residual_after(tiny_lm, batch, LAYER)
    steered = residual_after(tiny_lm, batch, LAYER, [[ConstantShift(LAYER, positions, v)]] * 2)
    delta = steered - base
    real = batch["attention_mask"].bool()
    expected = real.clone()
    if positions == "last":  # one forward call over the prompt: only its last position
        expected[:, :-1] = False
    for row in range(2):
        for pos in range(real.shape[1]):
            if expected[row, pos]:
                torch.testing.assert_close(delta[row, pos], v, atol=1e-5, rtol=0)
            else:
                assert torch.equal(delta[row, pos], torch.zeros_like(v)), (row, pos)


def test_rows_of_a_batch_are_independent(tiny_lm):
    batch = encode(tiny_lm, PROMPTS)
    a = ConstantShift(LAYER, "prompt", _vector(tiny_lm, 1))
    b = ConstantShift(LAYER, "prompt", _vector(tiny_lm, 2))
    with torch.no_grad():
        with apply(tiny_lm, [[a], [b]]):
            mixed = tiny_lm.model(**batch).logits
        with apply(tiny_lm, [[a], None]):
            only_a = tiny_lm.model(**batch).logits
        with apply(tiny_lm, [None, [b]]):
            only_b = tiny_lm.model(**batch).logits
    assert torch.equal(mixed[0], only_a[0])
    assert torch.equal(mixed[1], only_b[1])
    assert not torch.allclose(mixed[0], mixed[1])


def test_answer_distributions_read_in_length_order_keep_each_items_place_and_steering(tiny_lm):
    """The reader batches items from the shortest prompt to the longest; each result (and each row's own
    steering) still belongs to the item at its place in the input."""
    items = load_items(FIXTURES / "opinions_group_rural.jsonl")[:6]
    order = by_length(tiny_lm, items)
    lengths = [len(prompt_token_ids(tiny_lm.tokenizer, it)) for it in items]
    assert [lengths[i] for i in order] == sorted(lengths) and order != list(range(len(items)))
    shifts = [[ConstantShift(LAYER, "prompt", _vector(tiny_lm, k))] if k % 2 else None for k in range(len(items))]
    together = answer_distributions(tiny_lm, items, shifts, batch_size=4)
    for item, shift, read in zip(items, shifts, together, strict=True):
        np.testing.assert_allclose(read, answer_distributions(tiny_lm, [item], [shift])[0], atol=1e-5)
    assert not np.allclose(together[1], answer_distributions(tiny_lm, [items[1]])[0], atol=1e-3)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "qwen2"])
def test_a_prompt_reads_the_same_alone_and_left_padded_beside_longer_ones(family):
    """Positions count each row's real tokens: GPT-2's absolute position embeddings would otherwise see a
    padded prompt shifted right (its answer changed by ~0.09 here before)."""
    lm = make_tiny(family)
    items = load_items(FIXTURES / "opinions_group_rural.jsonl")[:5]
    together = answer_distributions(lm, items, batch_size=5)
    for item, read in zip(items, together, strict=True):
        np.testing.assert_allclose(read, answer_distributions(lm, [item])[0], atol=1e-5)


def test_zero_weight_blend_reproduces_unsteered_logits_exactly(tiny_lm):
    batch = encode(tiny_lm, PROMPTS)
    blend = compose([(ConstantShift(LAYER, "prompt", _vector(tiny_lm, 1)), 0.0),
                     (ConstantShift(1, "all", _vector(tiny_lm, 2)), 0.0)])
    with torch.no_grad():
        base = tiny_lm.model(**batch).logits
        with apply(tiny_lm, blend):
            steered = tiny_lm.model(**batch).logits
    assert torch.equal(base, steered)


def test_blend_is_the_weighted_sum_of_displacements(tiny_lm):
    batch = encode(tiny_lm, PROMPTS)
    va, vb = _vector(tiny_lm, 1), _vector(tiny_lm, 2)
    blend = compose([(ConstantShift(LAYER, "prompt", va), 0.25), (ConstantShift(LAYER, "prompt", vb), -1.5)])
    assert len(blend) == 1
    single = [ConstantShift(LAYER, "prompt", 0.25 * va - 1.5 * vb)]
    torch.testing.assert_close(residual_after(tiny_lm, batch, LAYER, [blend] * 2),
                               residual_after(tiny_lm, batch, LAYER, [single] * 2))


@pytest.mark.parametrize("positions", ["prompt", "last", "all"])
def test_generate_with_and_without_kv_cache_gives_the_same_tokens(positions):
    lm = make_tiny("llama", seed=3)
    batch = encode(lm, PROMPTS)
    iv = ConstantShift(LAYER, positions, 4.0 * _vector(lm, 5))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
    prompt_length = batch["input_ids"].shape[1]
    with torch.no_grad():
        plain = lm.model.generate(**batch, **kwargs)
        with apply(lm, [iv], prompt_length=prompt_length):
            cached = lm.model.generate(**batch, use_cache=True, **kwargs)
        with apply(lm, [iv], prompt_length=prompt_length):
            uncached = lm.model.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, plain), "the steering should change the greedy tokens"


def test_hooks_are_removed_when_the_forward_raises(tiny_lm):
    iv = ConstantShift(LAYER, "prompt", _vector(tiny_lm, 1))
    # transformers may keep output-recording hooks of its own: compare against what was there before.
    before = [dict(block._forward_hooks) for block in tiny_lm.blocks], dict(tiny_lm.model._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="planned for 3 rows"), apply(tiny_lm, [[iv]] * 3):
        tiny_lm.model(**encode(tiny_lm, PROMPTS))
    after = [dict(block._forward_hooks) for block in tiny_lm.blocks], dict(tiny_lm.model._forward_pre_hooks)
    assert after == before
    with apply(tiny_lm, [iv]):  # and the model can be steered again
        pass


def test_two_steerers_on_one_model_are_refused(tiny_lm):
    with apply(tiny_lm, []), pytest.raises(RuntimeError, match="already being steered"):
        SteeringHooks(tiny_lm)


def test_a_second_thread_running_the_steered_model_is_caught(tiny_lm):
    batch = encode(tiny_lm, PROMPTS)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with torch.no_grad():
                tiny_lm.model(**batch)
        except RuntimeError as exc:
            errors.append(exc)

    with apply(tiny_lm, [ConstantShift(LAYER, "prompt", _vector(tiny_lm, 1))]):
        thread = threading.Thread(target=run)
        thread.start()
        thread.join()
    assert errors and "second thread" in str(errors[0])


def test_layer_out_of_range_is_rejected(tiny_lm):
    from steer_core.errors import SteerError

    with pytest.raises(SteerError, match="out of range") as info, \
            apply(tiny_lm, [ConstantShift(tiny_lm.num_layers, "prompt", _vector(tiny_lm, 1))]):
        pass
    assert info.value.field == "layer"


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma", "gpt2", "gpt_neox"])
def test_every_family_is_steerable(family):
    lm = make_tiny(family)
    batch = encode(lm, PROMPTS)
    v = _vector(lm, 1)
    delta = residual_after(lm, batch, 1, [ConstantShift(1, "all", v)]) - residual_after(lm, batch, 1)
    torch.testing.assert_close(delta[1, -1], v, atol=1e-4, rtol=0)


def test_each_row_may_carry_its_own_prompt_end():
    """A decode call whose rows are at different stages (one generating, one still feeding its prompt a token
    at a time): `prompt` and `last` follow each row's own prompt end, padding never steered."""
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    # 6 columns, this call runs the last one; row 0's prompt ended at 4, row 1's ends at 8 (2 tokens to go).
    ctx = ForwardContext(past_length=5, prompt_length=(4, 8), seq_length=1, attention_mask=mask)
    assert ctx.position_mask("prompt").tolist() == [[False], [True]]
    assert ctx.position_mask("last").tolist() == [[True], [False]]
    assert ctx.position_mask("last", torch.tensor([1])).tolist() == [[False]]
    whole = ForwardContext(past_length=0, prompt_length=(6, 6), seq_length=6, attention_mask=mask)
    assert whole.position_mask("last").tolist() == [[False] * 5 + [True], [False] * 5 + [True]]
    assert whole.position_mask("prompt", torch.tensor([1])).tolist() == [[False, False, True, True, True, True]]


def test_only_position_local_steering_runs_a_prompt_in_pieces(tiny_lm):
    """A constant shift (and a blend of them) steers a prompt fed in several calls as in one; an
    intervention that does not say it is position-local, or a blend holding one, is read whole."""

    class ReadsTheWholeCall(ConstantShift):
        position_local = False

    shift = ConstantShift(layer=LAYER, positions="prompt", vector=_vector(tiny_lm, 1))
    odd = ReadsTheWholeCall(layer=LAYER, positions="prompt", vector=_vector(tiny_lm, 2))
    assert steers_in_chunks([shift]) and steers_in_chunks([]) and steers_in_chunks(compose([(shift, 0.5)]))
    assert not steers_in_chunks([shift, odd])
    assert not steers_in_chunks(compose([(shift, 0.5), (odd, 0.5)]))
