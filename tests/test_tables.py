"""Opinion items from tables through `datasets`: CSV, Parquet, JSONL and a saved Hugging Face dataset (never a
download), with a column mapping; errors name the row and the source column."""

from __future__ import annotations

import csv
import dataclasses
import json

import pytest
from support import FIXTURES

from service.cli.main import COLUMN_ROLES, main
from steer_core.data import load_items, load_jsonl
from steer_core.errors import SteerError
from steer_core.tables import Columns

MAPPING = Columns(question="prompt", options="choices", target="dist", id="qid")


def renamed_rows() -> list[dict]:
    """The urban fixture with a survey tool's own column names."""
    rows = [json.loads(line) for line in (FIXTURES / "opinions_group_urban.jsonl").read_text().splitlines()]
    return [{"qid": r.get("id", str(i)), "prompt": r["question"], "choices": r["options"], "dist": r["target"],
             "note": "ignored"} for i, r in enumerate(rows)]


def write_csv(path, rows, listed=json.dumps) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for r in rows:
            writer.writerow({k: listed(v) if isinstance(v, list) else v for k, v in r.items()})


@pytest.fixture
def expected():
    return load_jsonl(FIXTURES / "opinions_group_urban.jsonl")


def test_every_table_format_gives_the_same_items(tmp_path, expected):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = renamed_rows()
    write_csv(tmp_path / "json_cells.csv", rows)
    write_csv(tmp_path / "pipe_cells.csv", rows, listed=lambda v: "|".join(map(str, v)))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "survey.parquet")
    (tmp_path / "survey.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "saved_dict"))

    for name in ("json_cells.csv", "pipe_cells.csv", "survey.parquet", "saved"):
        assert load_items(tmp_path / name, columns=MAPPING) == expected, name  # format guessed
    assert load_items(tmp_path / "survey.jsonl", "jsonl", columns=MAPPING) == expected
    assert load_items(tmp_path / "saved_dict", columns=MAPPING, split="test") == expected
    with pytest.raises(SteerError) as caught:
        load_items(tmp_path / "saved_dict", columns=MAPPING)
    assert caught.value.field == "split" and "test" in caught.value.message


def test_errors_name_the_row_and_the_source_column(tmp_path):
    rows = renamed_rows()[:4]
    rows[2] = {**rows[2], "dist": [0.5, 0.1] + [0.0] * (len(rows[2]["choices"]) - 2)}
    write_csv(tmp_path / "bad.csv", rows)
    with pytest.raises(SteerError) as caught:
        load_items(tmp_path / "bad.csv", columns=MAPPING)
    assert caught.value.field == "bad.csv[2].dist" and "sum to 1" in caught.value.message

    with pytest.raises(SteerError) as caught:
        load_items(tmp_path / "bad.csv")  # default names: there is no `question` column
    assert caught.value.field == "question_column" and "prompt" in caught.value.message
    assert "--question-column" in caught.value.message  # a file read by the command line: its flag


def test_the_cli_maps_columns_and_reports_a_bad_cell_before_loading_a_model(tmp_path, capsys):
    assert set(COLUMN_ROLES) == {f.name for f in dataclasses.fields(Columns)}
    rows = renamed_rows()[:4]
    rows[1] = {**rows[1], "choices": ["only one"]}
    write_csv(tmp_path / "survey.csv", rows)
    code = main(["build", "--method", "diffmean", "--data", str(tmp_path / "survey.csv"), "--out",
                 str(tmp_path / "p.safetensors"), "--question-column", "prompt", "--options-column", "choices",
                 "--target-column", "dist", "--id-column", "qid"])
    assert code == 2 and "survey.csv[1].choices" in capsys.readouterr().err
    assert not (tmp_path / "p.safetensors").exists()
