"""The upload readers (`steer_core.tables.read_table`, `jsonl_objects`) under hypothesis: whatever the bytes
(random, or a well-formed CSV, JSONL, Parquet or gzip file cut, flipped or spliced), a reader returns valid
items or raises `SteerError` (a 422 with its field, in the API), never another exception (a 500); and one
set of text rules holds every way in: an item written to a CSV, a JSONL and a Parquet file reads back the
same from each, or is refused by each with the JSON body's message, naming the same row and field.

Bounded for CI: a few hundred small examples in all, a few seconds."""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from steer_core.errors import SteerError
from steer_core.items import (
    MAX_ID_CHARS,
    MAX_OPTION_CHARS,
    MAX_OPTIONS,
    MAX_QUESTION_CHARS,
    NUL_PROBLEM,
    SURROGATE_PROBLEM,
    OpinionItem,
    make_item,
    text_problem,
)
from steer_core.tables import MAX_ROW_BYTES, Columns, ReadLimits, jsonl_objects, read_table

FORMATS = ("csv", "jsonl", "parquet")
LIMITS = ReadLimits(rows=20, expanded_bytes=256 << 10)
FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

# Text that reaches the edges: NUL and other controls, CSV's and the list cells' syntax, line ends Python's
# str.splitlines would split on, a BOM, non-ASCII.
EDGY = st.sampled_from(["\x00", "\r", "\n", "\r\n", '"', ",", "|", "[", "]", "\\", " ", "\t", "\x1c", "\x85",
                        "\u2028", "\ufeff", "é", "😀", "NaN", "0"])
TEXT = st.lists(st.one_of(EDGY, st.text(max_size=4)), max_size=6).map("".join)
# Lengths at the limits (at, one over), and past 4 bytes a character (what a Parquet reader refuses before
# decoding: it must refuse it as make_item would, NUL after the limit included).
LENGTHS = [MAX_QUESTION_CHARS, MAX_OPTION_CHARS, MAX_ID_CHARS]
LONG = st.builds(lambda c, n, tail: c * n + tail, st.sampled_from(["x", "é", " "]),
                 st.sampled_from([n + d for n in LENGTHS for d in (0, 1)] + [4 * n + 1 for n in LENGTHS]),
                 st.sampled_from(["", "\x00", "y"]))
FIELD_TEXT = st.one_of(TEXT, TEXT, LONG)
NUMBER = st.one_of(st.floats(0, 1), st.floats(allow_nan=True, allow_infinity=True), st.just(1e16))


def write(tmp: Path, fmt: str, rows: list[dict]) -> Path:
    """`rows` (interchange fields) as a file: CSV with JSON list cells, JSONL, or Parquet."""
    path = tmp / f"{uuid.uuid4().hex}.{fmt}"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=["id", "question", "options", "target"])
        writer.writeheader()
        for r in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()})
        path.write_bytes(out.getvalue().encode())
    elif fmt == "jsonl":
        path.write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode())
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"id": pa.array([r["id"] for r in rows], pa.string()),
                                 "question": pa.array([r["question"] for r in rows], pa.string()),
                                 "options": pa.array([r["options"] for r in rows], pa.list_(pa.string())),
                                 "target": pa.array([r["target"] for r in rows], pa.list_(pa.float64()))}), path)
    return path


def outcome(read) -> tuple[str, list[OpinionItem] | tuple[str, str | None]]:
    """("ok", items) or ("error", (message, field)); any other exception fails the test."""
    try:
        return "ok", read()
    except SteerError as exc:
        return "error", (exc.message, exc.field)


def assert_valid(items: list[OpinionItem]) -> None:
    for it in items:
        assert text_problem(it.question, MAX_QUESTION_CHARS) is None and it.question.strip()
        assert 2 <= len(it.options) <= MAX_OPTIONS
        assert all(text_problem(o, MAX_OPTION_CHARS) is None and o.strip() for o in it.options)
        assert it.id is None or text_problem(it.id, MAX_ID_CHARS) is None
        assert math.isclose(sum(it.target), 1.0) and all(math.isfinite(p) for p in it.target)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


ROW = st.fixed_dictionaries({
    "id": st.one_of(st.none(), FIELD_TEXT),
    "question": FIELD_TEXT,
    "options": st.lists(FIELD_TEXT, min_size=0, max_size=4),
    "target": st.lists(NUMBER, min_size=0, max_size=4),
})


@FUZZ
@given(rows=st.lists(ROW, min_size=1, max_size=3))
def test_an_item_reads_the_same_from_every_format_and_from_json(tmp, rows):
    # The JSON body's way: make_item on each item (service.api.opinions.post_opinions), first error wins.
    def from_json() -> list[OpinionItem]:
        return [make_item(r["question"], r["options"], target=r["target"], id=r["id"], field=f"items[{i}]")
                for i, r in enumerate(rows)]

    expected, result = outcome(from_json)
    for fmt in FORMATS:
        path = write(tmp, fmt, rows)
        kind, got = outcome(lambda: read_table(path, fmt, Columns(), limits=ReadLimits(rows=20), name="upload"))  # noqa: B023
        if kind == "ok":
            assert_valid(got)  # type: ignore[arg-type]
        if expected == "ok":
            assert (kind, got) == ("ok", result), (fmt, got)
        else:
            message, field = result  # type: ignore[misc]
            assert kind == "error", (fmt, got, result)
            got_message, got_field = got  # type: ignore[misc]
            assert got_message == message and got_field == field.replace("items[", "upload[", 1), (fmt, got, result)


def mutate(data: bytes, how: str, at: int, junk: bytes) -> bytes:
    at = at % (len(data) + 1)
    if how == "cut":
        return data[:at]
    if how == "flip" and data:
        at = min(at, len(data) - 1)
        return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
    if how == "splice":
        return data[:at] + junk + data[at:]
    return data


@FUZZ
@given(rows=st.lists(ROW, min_size=1, max_size=3), fmt=st.sampled_from(FORMATS), gz=st.booleans(),
       how=st.sampled_from(["none", "cut", "flip", "splice"]), at=st.integers(0, 1 << 16),
       junk=st.one_of(st.binary(max_size=8), st.sampled_from([b"\xed\xa0\x80", b"\xff", b"\x00", b'"', b"\n",
                                                              b"PAR1", b"\x1f\x8b"])),
       declared=st.booleans())
def test_a_damaged_file_is_items_or_a_steer_error(tmp, rows, fmt, gz, how, at, junk, declared):
    path = write(tmp, fmt, rows)
    data = path.read_bytes()
    if gz and fmt != "parquet":
        data = gzip.compress(data)
    path.write_bytes(mutate(data, how, at, junk))
    compression = "gzip" if gz and declared and fmt != "parquet" else None
    kind, got = outcome(lambda: read_table(path, fmt, Columns(), compression=compression, limits=LIMITS,
                                           name="upload"))
    if kind == "ok":
        assert_valid(got)  # type: ignore[arg-type]
    else:
        assert got[1] is None or got[1] == "upload" or got[1].startswith(("upload[", "upload.", "compression")) \
            or got[1].endswith("_column"), got


@FUZZ
@given(data=st.binary(max_size=600), fmt=st.sampled_from(FORMATS), compression=st.sampled_from([None, "gzip"]))
def test_any_bytes_are_items_or_a_steer_error(tmp, data, fmt, compression):
    path = tmp / f"{uuid.uuid4().hex}.bin"
    path.write_bytes(gzip.compress(data) if compression else data)
    kind, got = outcome(lambda: read_table(path, fmt, Columns(), compression=None if fmt == "parquet" else compression,
                                           limits=LIMITS, name="upload"))
    if kind == "ok":
        assert_valid(got)  # type: ignore[arg-type]
    if fmt == "jsonl":  # the console's reader
        outcome(lambda: list(jsonl_objects(io.BytesIO(path.read_bytes()), compression=compression, limits=LIMITS)))


@FUZZ
@given(lines=st.lists(st.one_of(st.binary(max_size=40), st.sampled_from([b"{}", b"[]", b"1e999", b'{"a": 1}'])),
                      max_size=6),
       long=st.integers(0, 2))
def test_jsonl_lines_are_objects_or_a_steer_error_naming_the_row(lines, long):
    body = b"\n".join(lines) + b"\n" + (b" " * (MAX_ROW_BYTES + 1) if long == 2 else b"")
    try:
        for row, line, obj in jsonl_objects(io.BytesIO(body), limits=LIMITS, name="items"):
            assert isinstance(obj, dict) and row >= 0 and line >= 1
    except SteerError as exc:
        assert exc.field == "items" or exc.field.startswith("items["), exc.field


def test_the_json_bodies_text_rules_are_the_items_rules():
    """The API's JSON reader (service.api.openapi) and make_item refuse NUL and lone surrogates with one
    message, so a JSON body and a file get the same answer."""
    from service.api.errors import ApiError
    from service.api.openapi import check_json_value

    for bad, message in (("a\x00b", NUL_PROBLEM), ("a\ud800", SURROGATE_PROBLEM)):
        with pytest.raises(ApiError) as caught:
            check_json_value({"items": [{"question": bad}]})
        assert caught.value.message == message == text_problem(bad)
        with pytest.raises(SteerError) as refused:
            make_item(bad, ["a", "b"], answer=0)
        assert refused.value.message == message and refused.value.field == "item.question"
