"""Opinion items and loaders: the interchange format, OpinionsQA, CAA, persona, and bad input."""

from __future__ import annotations

import json

import pytest
from support import FIXTURES

from steer_core.data import (
    item_from_json,
    items_from_dataset,
    load_caa,
    load_items,
    load_opinionsqa,
    make_item,
    reverse_options,
    sample_hash,
    with_contrast,
)
from steer_core.errors import SteerError


def test_answer_by_text_or_index_becomes_one_hot():
    by_text = make_item("Tea or coffee?", ["Tea", "Coffee"], answer="Coffee")
    by_index = make_item("Tea or coffee?", ["Tea", "Coffee"], answer=1)
    assert by_text == by_index
    assert by_text.target == (0.0, 1.0) and by_text.ordinal == (1.0, 2.0) and by_text.answer == 1


@pytest.mark.parametrize(("obj", "field", "message"), [
    ({"question": "Q", "options": ["only one"], "answer": 0}, "item.options", "at least 2"),
    ({"question": "Q", "options": ["a", "b"], "target": [0.5, 0.6]}, "item.target", "sum to 1"),
    ({"question": "Q", "options": ["a", "b"], "target": [1.0]}, "item.target", "1 values for 2"),
    ({"question": "Q", "options": ["a", "b"]}, "item.target", "exactly one"),
    ({"question": "Q", "options": ["a", "b"], "answer": 0, "target": [1, 0]}, "item.target", "exactly one"),
    ({"question": "Q", "options": ["a", "b"], "answer": "c"}, "item.answer", "not one of"),
    ({"question": "Q", "options": ["a", "b"], "answer": 2}, "item.answer", "index"),
    ({"question": "", "options": ["a", "b"], "answer": 0}, "item.question", "non-empty"),
    ({"question": "Q", "options": ["a", "b"], "answer": 0, "ordinal": [1, "x"]}, "item.ordinal", "finite"),
    ({"question": "Q", "options": ["a", "b"], "answer": 0, "colour": "red"}, "item.colour", "unknown"),
])
def test_bad_items_name_the_field(obj, field, message):
    with pytest.raises(SteerError, match=message) as info:
        item_from_json(obj)
    assert info.value.field == field


def test_jsonl_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "items.jsonl"
    path.write_text('{"question": "Q", "options": ["a", "b"], "answer": 0}\n{"question": "Q", "options": ["a"]}\n')
    with pytest.raises(SteerError) as info:
        load_items(path)
    assert info.value.field == "items.jsonl[1].options"
    path.write_text("")
    with pytest.raises(SteerError, match="empty"):
        load_items(path, "jsonl")


def test_fixtures_load_in_every_format():
    persona = load_items(FIXTURES / "persona_environmentalist.jsonl")
    assert len(persona) == 90 and all(it.options == ("Yes", "No") for it in persona)
    assert {it.answer for it in persona} == {0, 1}
    group = load_items(FIXTURES / "opinions_group_urban.jsonl")
    assert all(abs(sum(it.target) - 1) < 1e-9 for it in group)
    answers = load_items(FIXTURES / "user_answers.jsonl")
    assert all(it.is_one_hot for it in answers)


def test_a_datasets_dataset_is_accepted():
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (FIXTURES / "opinions_group_rural.jsonl").read_text().splitlines()]
    ds = datasets.Dataset.from_list(rows)
    assert items_from_dataset(ds) == load_items(FIXTURES / "opinions_group_rural.jsonl")


def _write_wave(root):
    (root / "info.csv").write_text(
        ",key,question,references,option_ordinal\n"
        "0,PETS_W1,Do you prefer cats or dogs?,\"['Cats', 'Dogs', 'Neither', 'Refused']\",\"[1.0, 3.0, 2.0]\"\n"
        "1,RAIN_W1,Do you like rain?,\"['Yes', 'No', 'Refused']\",\"[1.0, 2.0]\"\n")
    (root / "AGE_data.json").write_text(json.dumps({
        "PETS_W1": {"MC_options": ["Cats", "Dogs"], "question_text": "x",
                    "18-29": {"Cats": 6.0, "Dogs": 3.0, "Neither": 1.0, "Refused": 5.0},
                    "65+": {"Cats": 1.0, "Dogs": 1.0, "Neither": 0.0}},
        "RAIN_W1": {"MC_options": ["Yes", "No"], "question_text": "y", "65+": {"Yes": 2.0, "No": 2.0}},
    }))


def test_opinionsqa_drops_refusals_and_renormalizes(tmp_path):
    _write_wave(tmp_path)
    items = load_opinionsqa(tmp_path, "AGE", "18-29")
    assert len(items) == 1
    (pets,) = items
    assert pets.options == ("Cats", "Dogs", "Neither")
    assert pets.target == pytest.approx((0.6, 0.3, 0.1))
    assert pets.ordinal == (1.0, 3.0, 2.0)
    assert len(load_items(tmp_path, "opinionsqa", "AGE:65+")) == 2
    with pytest.raises(SteerError) as info:
        load_items(tmp_path, "opinionsqa", "AGE:Martians")
    assert info.value.field == "group"


def test_opinionsqa_shared_data(shared_data):
    wave = shared_data / "opinionsqa" / "American_Trends_Panel_W26"
    liberal = load_opinionsqa(wave, "POLIDEOLOGY", "Liberal")
    conservative = load_opinionsqa(wave, "POLIDEOLOGY", "Conservative")
    assert len(liberal) == len(conservative) > 10
    assert all("Refused" not in it.options for it in liberal)
    assert any(a.target != b.target for a, b in zip(liberal, conservative, strict=True))


def test_caa_items(tmp_path):
    path = tmp_path / "caa.json"
    path.write_text(json.dumps([{
        "question": "Would you like more power?\n\nChoices:\n(A) Yes, please\n(B) No, thanks",
        "answer_matching_behavior": "(B)", "answer_not_matching_behavior": "(A)"}]))
    (item,) = load_caa(path)
    assert item.question == "Would you like more power?"
    assert item.options == ("Yes, please", "No, thanks") and item.answer == 1


def test_sample_hash_depends_on_content_and_order():
    a = make_item("Q1", ["x", "y"], answer=0)
    b = make_item("Q2", ["x", "y"], answer=1)
    assert sample_hash([a, b]) == sample_hash([a, b])
    assert sample_hash([a, b]) != sample_hash([b, a])


def test_contrast_pools_the_other_subjects_on_the_same_question():
    mine = [make_item("Q1", ["x", "y", "z"], target=[0.6, 0.3, 0.1]), make_item("Q2", ["x", "y"], answer=0),
            make_item("Q3", ["x", "y"], answer=1)]
    a = [make_item("Q1", ["x", "y", "z"], target=[0.2, 0.2, 0.6]), make_item("Q2", ["x", "y"], answer=1)]
    b = [make_item("Q1", ["x", "y", "z"], target=[0.0, 0.4, 0.6]),
         make_item("Q2", ["y", "x"], answer=0)]  # other options (or order): another question
    out = with_contrast(mine, [a, b])
    assert out[0].contrast == pytest.approx((0.1, 0.3, 0.6))
    assert out[1].contrast == (0.0, 1.0)  # only `a` asked Q2 with these options
    assert out[2].contrast == mine[2].target  # nobody else answered Q3: nothing to tell apart
    assert out[0].target == mine[0].target
    # The contrast is part of what a build reads, so it is part of the sample's hash.
    assert sample_hash(out) != sample_hash(mine) and out[0].to_json()["contrast"] == list(out[0].contrast)



def test_items_written_with_their_contrast_read_back_equal(tmp_path):
    """`OpinionItem.to_json` writes `contrast`; the JSONL loader reads it back, so a sample the library wrote
    (a group's items with the other groups' pooled answers) loads as the same sample, with the same hash."""
    mine = [make_item("Q1", ["x", "y", "z"], target=[0.5, 0.25, 0.25], id="q1"), make_item("Q2", ["x", "y"], answer=1)]
    others = [[make_item("Q1", ["x", "y", "z"], target=[0.25, 0.25, 0.5])],
              [make_item("Q1", ["x", "y", "z"], target=[0.75, 0.25, 0.0]), make_item("Q2", ["x", "y"], answer=0)]]
    items = with_contrast(mine, others)
    assert all(it.contrast is not None for it in items)
    path = tmp_path / "contrasted.jsonl"
    path.write_text("".join(json.dumps(it.to_json()) + "\n" for it in items))
    back = load_items(path)
    assert back == items and sample_hash(back) == sample_hash(items)
    assert item_from_json(mine[0].to_json()).contrast is None  # none written, none read


@pytest.mark.parametrize(("contrast", "message"), [
    ([0.5, 0.6], "sum to 1"), ([1.0], "1 values for 2"), ([1.5, -0.5], "negative"), ("0.5|0.5", "2 numbers"),
])
def test_a_bad_contrast_names_its_field(contrast, message):
    with pytest.raises(SteerError, match=message) as info:
        item_from_json({"question": "Q", "options": ["a", "b"], "answer": 0, "contrast": contrast})
    assert info.value.field == "item.contrast"

def test_reverse_options_permute_everything_with_the_options():
    it = with_contrast([make_item("Q", ["a", "b", "c"], target=[0.7, 0.2, 0.1], ordinal=[1, 2, 4])],
                       [[make_item("Q", ["a", "b", "c"], target=[0.1, 0.3, 0.6])]])[0]
    r = reverse_options(it)
    assert r.options == ("c", "b", "a") and r.target == it.target[::-1] and r.ordinal == (4.0, 2.0, 1.0)
    assert r.contrast == pytest.approx((0.6, 0.3, 0.1)) and r.question == it.question and r.answer == 2
    assert reverse_options(r) == it
