"""Every build records each item's alignment (unsteered, calibrated, as shipped) in `metrics["per_item"]`, and
those numbers are the ones its summary metrics average."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from steer_core import build_profile
from steer_core.build import PER_ITEM_LIMIT, QUESTION_CHARS, per_item_record
from steer_core.data import load_items, make_item

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
ITEMS = load_items(FIXTURES / "opinions_group_rural.jsonl")[:8]
LONG = dataclasses.replace(ITEMS[0], id=None, question="Thinking about the next ten years, " * 6 + "what matters most?")
SAMPLE = [*ITEMS, LONG]

# Each method's fastest parameters on the tiny model; the layer is fixed, the strength searched out of fold.
FAST = {"diffmean": {}, "cold_fd": {"rank": 4}, "cold_kernel": {}, "odesteer": {"n_components": 512},
        "lora": {"steps": 2}}


def column(per_item: dict, name: str) -> np.ndarray:
    return np.asarray([row[name] for row in per_item["items"]], dtype=float)


def check_rows(per_item: dict, items) -> None:
    assert per_item["metric"] == "alignment" and per_item["total"] == len(items)
    assert per_item["limit"] == PER_ITEM_LIMIT and len(per_item["items"]) == len(items)
    for i, (row, it) in enumerate(zip(per_item["items"], items, strict=True)):
        assert row["index"] == i and row["id"] == it.id
        assert len(row["question"]) <= QUESTION_CHARS
        assert it.question.startswith(row["question"].rstrip("…"))


@pytest.mark.parametrize("method", sorted(FAST))
def test_a_cross_validated_build_records_the_numbers_its_summary_averages(tiny_lm, method):
    profile = build_profile(tiny_lm, SAMPLE, method, {"layer": 1, **FAST[method]})
    m = profile.metrics
    assert m["evaluation"] == "cross-validated"
    per_item = m["per_item"]
    check_rows(per_item, SAMPLE)
    assert per_item["items"][-1]["id"] is None and per_item["items"][-1]["question"].endswith("…")
    for name in ("unsteered", "calibrated", "steered"):
        assert column(per_item, name).mean() == pytest.approx(m[name]["alignment"], abs=1e-6), name
    gain = column(per_item, "steered") - column(per_item, "calibrated")
    # A shipped question lean adds its own out-of-fold gain over the plain calibration of what ships.
    lean = m["question_lean"]
    assert lean["shipped"] == (profile.question_lean is not None)
    lean_gain = lean["gain_vs_calibration"]["alignment"] if lean["shipped"] else 0.0
    if m["steering_shipped"]:
        assert profile.strength > 0
        # The shipped setting is the best candidate: its per-item gains are the recorded gain and its error.
        assert gain.mean() == pytest.approx(m["gain_vs_calibrated"]["alignment"] + lean_gain, abs=1e-5)
        if not lean["shipped"]:
            assert gain.std(ddof=1) / np.sqrt(gain.size) == pytest.approx(
                m["gain_vs_calibrated"]["standard_error"], abs=1e-6)
    else:
        assert profile.strength == 0  # calibration only: steered is calibrated, with the lean's gain if any
        assert gain.mean() == pytest.approx(lean_gain, abs=1e-5)
        assert np.all(gain == 0) or lean["shipped"]


@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_an_in_sample_build_records_its_per_item_numbers_without_a_calibrated_reading(tiny_lm, strength):
    profile = build_profile(tiny_lm, SAMPLE, "diffmean", {"layer": 1, "strength": strength})
    m = profile.metrics
    check_rows(m["per_item"], SAMPLE)
    assert all(row["calibrated"] is None for row in m["per_item"]["items"])  # no calibration is fitted
    for name in ("unsteered", "steered"):
        assert column(m["per_item"], name).mean() == pytest.approx(m[name]["alignment"], abs=1e-6), name
    moved = column(m["per_item"], "steered") - column(m["per_item"], "unsteered")
    assert np.all(moved == 0) if strength == 0 else np.any(moved != 0)


def test_the_record_is_capped_and_counts_the_whole_sample():
    items = [make_item(f"Question {i}? " + "x" * 200, ["a", "b"], target=[0.5, 0.5]) for i in range(PER_ITEM_LIMIT + 7)]
    values = np.linspace(0, 1, len(items))
    record = per_item_record(items, values, None, values[::-1])
    assert record["total"] == PER_ITEM_LIMIT + 7 and len(record["items"]) == PER_ITEM_LIMIT
    last = record["items"][-1]
    assert last["index"] == PER_ITEM_LIMIT - 1 and last["calibrated"] is None
    assert last["unsteered"] == pytest.approx(values[PER_ITEM_LIMIT - 1], abs=1e-6)
    assert last["steered"] == pytest.approx(values[::-1][PER_ITEM_LIMIT - 1], abs=1e-6)
    assert len(last["question"]) == QUESTION_CHARS and last["question"].endswith("…")
