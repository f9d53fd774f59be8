"""Opinion items from tables, read with Hugging Face `datasets`: CSV, Parquet and JSONL files, a dataset
saved with `save_to_disk`, or a dataset on the Hugging Face hub by name (where the machine is online).

A `Columns` mapping says which column holds each field of the interchange format (`question`, `options`,
`target` or `answer`, `ordinal`, `id`). List fields may be real lists (Parquet, JSONL, datasets) or text
(CSV): a JSON array (`["Yes", "No"]`, `[0.6, 0.4]`) or `|`-separated values (`Yes|No`, `0.6|0.4`).
Errors name the file, the row and the source column (`survey.csv[3].dist`).
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from steer_core.errors import SteerError
from steer_core.items import OpinionItem, make_item

TABLE_FORMATS = ("csv", "parquet", "jsonl", "hf")  # hf: a saved dataset directory or a hub name


@dataclass(frozen=True)
class Columns:
    """The source column of each interchange field (defaults: the interchange names themselves)."""

    question: str = "question"
    options: str = "options"
    target: str = "target"
    answer: str = "answer"
    ordinal: str = "ordinal"
    id: str = "id"


def open_table(source: str | Path, fmt: str, split: str = "train") -> Any:
    """The rows of `source` as a `datasets.Dataset` (imported here: it takes seconds to load)."""
    import datasets

    datasets.disable_progress_bars()
    if fmt == "hf":
        path = Path(source)
        if path.exists():
            loaded = datasets.load_from_disk(str(path))
        else:  # a hub name: downloads where the machine is online
            try:
                return datasets.load_dataset(str(source), split=split)
            except Exception as exc:  # the hub's errors vary by version: report the name and the reason
                raise SteerError(f"cannot load the dataset {source!r}: {exc}", "data") from None
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise SteerError(f"no split {split!r}; the dataset has {', '.join(loaded)}", "split")
            return loaded[split]
        return loaded
    readers = {"csv": datasets.Dataset.from_csv, "parquet": datasets.Dataset.from_parquet,
               "jsonl": datasets.Dataset.from_json}
    if fmt not in readers:
        raise SteerError(f"unknown table format {fmt!r}; choose one of {', '.join(TABLE_FORMATS)}", "format")
    # A private cache: nothing is left under ~/.cache by reading a local file.
    with tempfile.TemporaryDirectory(prefix="pluristeer-table-") as cache:
        try:
            table = readers[fmt](str(source), cache_dir=cache, keep_in_memory=True)
        except (ValueError, OSError) as exc:
            raise SteerError(f"cannot read {Path(source).name} as {fmt}: {exc}", "data") from None
    return table


def cli_flag(role: str) -> str:
    """How a command line maps a field's column: `--question-column`."""
    return f"--{role}-column"


def query_parameter(role: str) -> str:
    """How an HTTP upload maps a field's column: `?question_column=`."""
    return f"?{role}_column="


def items_from_rows(rows: Iterable[Mapping[str, Any]], columns: Columns, column_names: Iterable[str],
                    name: str, mapped_by: Callable[[str], str] = cli_flag) -> list[OpinionItem]:
    """Rows with the mapped columns as opinion items; `name` prefixes error fields; `mapped_by` names the
    option that maps a field's column (a command line's flag, an HTTP query parameter) in errors."""
    present = set(column_names)
    for role in ("question", "options"):
        column = getattr(columns, role)
        if column not in present:
            raise SteerError(f"no column {column!r} in {name} (columns: {', '.join(sorted(present))}); "
                             f"map it with {mapped_by(role)}", f"{role}_column")
    if columns.target not in present and columns.answer not in present:
        raise SteerError(f"{name} has neither a {columns.target!r} nor an {columns.answer!r} column; map one "
                         f"with {mapped_by('target')} or {mapped_by('answer')}", "target_column")
    source = {field: column for field, column in asdict(columns).items() if column in present}
    items = []
    for i, row in enumerate(rows):
        at = f"{name}[{i}]"
        values = {field: _cell(row.get(column)) for field, column in source.items()}
        try:
            for field in ("options", "target", "ordinal"):
                values[field] = _listed(values.get(field), field in ("target", "ordinal"), f"{at}.{source.get(field)}")
            items.append(make_item(values.get("question"), values.get("options"), target=values.get("target"),
                                   answer=values.get("answer"), ordinal=values.get("ordinal"), id=values.get("id"),
                                   field=at))
        except SteerError as exc:
            # make_item names the interchange field; name the source column instead
            field = exc.field or at
            for interchange, column in source.items():
                if field == f"{at}.{interchange}":
                    field = f"{at}.{column}"
            raise SteerError(exc.message, field) from None
    if not items:
        raise SteerError("the sample is empty", name)
    return items


def load_table(source: str | Path, fmt: str, columns: Columns | None = None, split: str = "train") -> list[OpinionItem]:
    """Opinion items from a table file, a saved dataset or a hub dataset name."""
    table = open_table(source, fmt, split)
    return items_from_rows(table, columns or Columns(), table.column_names, Path(str(source)).name)


def _cell(value: Any) -> Any:
    """An empty cell (None, NaN, blank text) as absent."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str) and not value.strip():
        return None
    return value


def _listed(value: Any, numbers: bool, field: str) -> Any:
    """A list field written as text (a JSON array or `a|b|c`) as a list; other values unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            raise SteerError("is not a valid JSON array", field) from None
    parts = [p.strip() for p in text.split("|")]
    if not numbers:
        return parts
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise SteerError(f"expected numbers separated by '|', got {value!r}", field) from None
