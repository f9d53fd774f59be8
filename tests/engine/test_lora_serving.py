"""LoRA profiles in the generation engine: rows with different adapters, steering, blends of both and none
share one batch, and each row gets the tokens it gets alone (tiny random model); on the real default model
the service's answer distributions under an adapter are peft's own."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from support import FIXTURES

from service.engine.engine import GenerationEngine, PlannedProfile, SamplingParams, SteeringPlan, SteeringRejected
from steer_core import lora
from steer_core.data import load_items
from steer_core.export import peft_files
from steer_core.methods import intervention
from steer_core.profile import Profile
from steer_core.prompts import answer_distributions, encode_items, last_logits_only, option_log_probs

ITEMS = load_items(FIXTURES / "opinions_group_rural.jsonl")
CHATS = ["Hello, who are you?", "Tell me about trains and buses in a small town.", "Hi", "What is rain?"]
LONG = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _adapter(lm, items, layer, strength, **params):
    profile = lora.fit(lm, items, [layer], lora.check_params({"steps": 3, "lr": 0.05, **params}), "all")[layer]
    profile.strength = strength
    return profile


def test_every_row_of_a_mixed_engine_batch_gets_its_tokens_alone(tiny_lm):
    stored = {"a": _adapter(tiny_lm, ITEMS[:6], 0, 3.0), "b": _adapter(tiny_lm, ITEMS[6:12], 2, 3.0, rank=2),
              "shift": Profile(method="diffmean", model_name=tiny_lm.name, model_fingerprint=tiny_lm.fingerprint,
                               layer=2, positions="prompt", strength=1.0,
                               tensors={"vector": 4.0 * torch.randn(tiny_lm.hidden_size,
                                                                    generator=torch.Generator().manual_seed(3))})}

    def plan(*weighted: tuple[str, float]) -> SteeringPlan:
        return SteeringPlan(tuple(PlannedProfile(name, w) for name, w in weighted))

    steering = [plan(("a", 1.0)), plan(("b", 1.0)), None, plan(("a", 0.5), ("shift", 1.0), ("b", -0.5))]
    # Plans name profiles by artifact digest; here the names stand in for digests.
    engine = GenerationEngine(tiny_lm, profiles=stored.__getitem__, max_batch_size=4, batch_wait_ms=200)
    try:
        prompts = [engine.tokenize_chat([{"role": "user", "content": c}]) for c in CHATS]
        alone = [engine.generate(p, LONG, s, timeout=120).token_ids for p, s in zip(prompts, steering, strict=True)]
        plain = [engine.generate(p, LONG, None, timeout=120).token_ids for p in prompts]
        assert alone[0] != plain[0] and alone[1] != plain[1], "the adapters should change the greedy tokens"
        handles = [engine.submit(p, LONG, s) for p, s in zip(prompts, steering, strict=True)]
        assert [h.result(120).token_ids for h in handles] == alone
        assert engine.stats.largest_batch == 4
    finally:
        engine.stop()


def test_a_positions_override_on_an_adapter_is_refused_naming_positions(tiny_lm):
    """An adapter changes every position's computation: an engine plan asking it for other positions is
    refused, not served as if it had not asked."""
    stored = {"a": _adapter(tiny_lm, ITEMS[:6], 1, 1.0)}
    engine = GenerationEngine(tiny_lm, profiles=stored.__getitem__, max_batch_size=2, batch_wait_ms=0)
    try:
        prompt = engine.tokenize_chat([{"role": "user", "content": CHATS[0]}])
        for positions in ("prompt", "last"):
            with pytest.raises(SteeringRejected) as info:
                engine.generate(prompt, LONG, SteeringPlan((PlannedProfile("a", positions=positions),)), timeout=120)
            assert info.value.field == "steering.positions" and "all" in str(info.value)
        own = engine.generate(prompt, LONG, SteeringPlan((PlannedProfile("a"),)), timeout=120).token_ids
        assert engine.generate(prompt, LONG, SteeringPlan((PlannedProfile("a", positions="all"),)),
                               timeout=120).token_ids == own
    finally:
        engine.stop()


@pytest.mark.model
def test_peft_gives_the_services_distributions_on_the_default_model(default_lm, tmp_path):
    from steer_core.models import load_model

    items = ITEMS[:4]
    profile = _adapter(default_lm, items, default_lm.num_layers - 2, 1.0)  # the top two blocks: cheap to train
    for name, data in peft_files(profile).items():
        (tmp_path / name).write_bytes(data)
    # One option order, as peft reads the prompts below.
    served = answer_distributions(default_lm, ITEMS[20:26], [intervention(profile, default_lm)], orders=1)
    unsteered = answer_distributions(default_lm, ITEMS[20:26], orders=1)
    peft_model = PeftModel.from_pretrained(load_model().model, str(tmp_path)).eval()
    batch = encode_items(default_lm, ITEMS[20:26])
    with torch.no_grad():
        logits = peft_model(**batch, use_cache=False, **last_logits_only(default_lm)).logits[:, -1, :]
    theirs = option_log_probs(default_lm, logits, ITEMS[20:26]).exp()
    for i, (ours, base) in enumerate(zip(served, unsteered, strict=True)):
        assert abs(ours - base).max() > 1e-4
        torch.testing.assert_close(torch.tensor(ours, dtype=torch.float32), theirs[i, :len(ours)], atol=1e-4, rtol=0)
