"""Opinion items from tables: CSV, Parquet and JSONL files, read here, streamed and bounded; a dataset saved
with `save_to_disk` or a dataset on the Hugging Face hub by name (where the machine is online), read with
Hugging Face `datasets`.

A `Columns` mapping says which column holds each field of the interchange format (`question`, `options`,
`target` or `answer`, `ordinal`, `id`). List fields may be real lists (Parquet, JSONL, datasets) or text
(CSV): a JSON array (`["Yes", "No"]`, `[0.6, 0.4]`) or `|`-separated values (`Yes|No`, `0.6|0.4`). A CSV
`answer` cell is an option's text, or the option's index where no option has that text.
Errors name the file, the row and the source column (`survey.csv[3].dist`).

Files are read a row at a time (Parquet: PARQUET_BATCH_ROWS rows, its text columns as dictionaries), and
counted while read (`ReadLimits`): rows; bytes once decompressed (CSV and JSONL: their text; Parquet: the
mapped columns' pages once decompressed, by the file's metadata, and their values once decoded, before they
become Python objects); one row's bytes (MAX_ROW_BYTES); each text field's length (`steer_core.items`'
limits, also checked on Parquet's decoded cells before they become Python objects). A file that expands
(a gzip or Parquet "bomb") is refused after reading about as much as the limits allow, never whole.
Compression (gzip, bz2, xz) is read only where declared (`compression=`; on the command line a `.gz`,
`.bz2` or `.xz` suffix): a compressed file that does not say so, or a Parquet file given as text, is
refused by its first bytes (`sniff`).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import lzma
import math
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any, cast

from steer_core.errors import SteerError
from steer_core.items import (
    MAX_ID_CHARS,
    MAX_OPTION_CHARS,
    MAX_OPTIONS,
    MAX_QUESTION_CHARS,
    OpinionItem,
    make_item,
    shown,
)

TABLE_FORMATS = ("csv", "parquet", "jsonl", "hf")  # hf: a saved dataset directory or a hub name
# One row of a CSV or JSONL file (with its line ends), in bytes once decompressed. Also the most a text
# cell of a Parquet file holds where a list is written as text (`Yes|No`).
MAX_ROW_BYTES = 1 << 20
# Rows of a Parquet file decoded at a time.
PARQUET_BATCH_ROWS = 32
COMPRESSIONS = ("gzip", "bz2", "xz")
_SUFFIXES = {".gz": "gzip", ".bz2": "bz2", ".xz": "xz"}
# What a file's first bytes say it is (`sniff`).
_MAGIC = ((re.compile(re.escape(b"\x1f\x8b")), "gzip"), (re.compile(b"BZh[1-9]1AY&SY"), "bz2"),
          (re.compile(re.escape(b"\xfd7zXZ\x00")), "xz"), (re.compile(re.escape(b"PK\x03\x04")), "zip"),
          (re.compile(re.escape(b"\x28\xb5\x2f\xfd")), "zstd"), (re.compile(re.escape(b"PAR1")), "parquet"))
# A byte that is not UTF-8, as `surrogateescape` keeps it.
_BAD_BYTE = re.compile("[\udc80-\udcff]")

# Python's csv refuses a cell longer than field_size_limit (131,072 characters by default); a cell may be as
# long as a row. (A process-wide setting: only ever raised.)
if csv.field_size_limit() < MAX_ROW_BYTES:
    csv.field_size_limit(MAX_ROW_BYTES)


@dataclass(frozen=True)
class Columns:
    """The source column of each interchange field (defaults: the interchange names themselves)."""

    question: str = "question"
    options: str = "options"
    target: str = "target"
    answer: str = "answer"
    ordinal: str = "ordinal"
    id: str = "id"


@dataclass(frozen=True)
class ReadLimits:
    """Totals a file is held to while it is read (None: no limit): its rows, and its bytes once decompressed
    (Parquet: decoded). MAX_ROW_BYTES and the text limits hold whatever these are."""

    rows: int | None = None
    expanded_bytes: int | None = None


class TooLarge(SteerError):
    """A file past one of `ReadLimits`' totals: `what` is "rows" or "bytes", `limit` that total."""

    def __init__(self, message: str, field: str | None, what: str, limit: int) -> None:
        super().__init__(message, field)
        self.what = what
        self.limit = limit


def sniff(source: str | Path | IO[bytes]) -> str | None:
    """What a file's first bytes say it is: a compression (`gzip`, `bz2`, `xz`, `zip`, `zstd`), `parquet`
    (PAR1 at both ends), or None (anything else, text included). A stream is read from where it is and put
    back there."""
    def look(f: IO[bytes]) -> tuple[bytes, bytes]:
        at = f.tell()
        head = f.read(16)
        f.seek(0, 2)
        tail = b""
        if f.tell() - at >= 8:
            f.seek(-4, 2)
            tail = f.read(4)
        f.seek(at)
        return head, tail

    if isinstance(source, str | Path):
        try:
            with open(source, "rb") as f:
                head, tail = look(f)
        except OSError as exc:
            raise SteerError(f"cannot read {source}: {exc.strerror or exc}", str(source)) from None
    else:
        head, tail = look(source)
    kind = next((kind for magic, kind in _MAGIC if magic.match(head)), None)
    return None if kind == "parquet" and tail != b"PAR1" else kind


def compression_of(name: str | Path) -> str | None:
    """The compression a file's name declares by its suffix (`.gz`, `.bz2`, `.xz`), or None."""
    return _SUFFIXES.get(Path(name).suffix.lower())


def read_table(path: str | Path, fmt: str, columns: Columns | None = None, *, compression: str | None = None,
               limits: ReadLimits = ReadLimits(), name: str | None = None,
               mapped_by: Callable[[str], str] | None = None,
               declare: str = "name it with a .gz, .bz2 or .xz suffix") -> list[OpinionItem]:
    """The opinion items of a CSV, JSONL or Parquet file, streamed and held to `limits` (see the module).
    `compression` is the one declared (None: none; a compressed file is then refused, `declare` saying how
    to declare it); `name` prefixes error fields (default: the file's name); `mapped_by` names the option
    that maps a field's column (default: the command line's flag)."""
    path = Path(path)
    name = name or path.name
    columns = columns or Columns()
    if fmt not in ("csv", "jsonl", "parquet"):
        raise SteerError(f"unknown table format {fmt!r}; choose one of csv, jsonl, parquet", "format")
    _check_kind(sniff(path), fmt, compression, name, declare)
    with ExitStack() as stack:
        if fmt == "parquet":
            column_names, rows = _parquet_rows(stack, path, columns, limits, name)
        else:
            lines = _Lines(stack.enter_context(_open_bytes(path, compression)), limits, name, compression)
            if fmt == "csv":
                column_names, rows = _csv_rows(lines, name)
            else:
                column_names, rows = _jsonl_rows(lines, name)
        return items_from_rows(rows, columns, column_names, name, mapped_by or cli_flag, text_cells=fmt == "csv",
                               sparse=fmt == "jsonl")


def jsonl_objects(source: str | Path | IO[bytes], *, compression: str | None = None,
                  limits: ReadLimits = ReadLimits(), name: str | None = None,
                  declare: str = "name it with a .gz, .bz2 or .xz suffix") -> Iterator[tuple[int, int, dict[str, Any]]]:
    """The objects of a JSONL file (a path, or a seekable binary stream) as `(row, line number, object)`,
    streamed and held to `limits` and MAX_ROW_BYTES (blank lines skipped; errors name `name[row]`);
    `compression` as `read_table` takes it."""
    name = name or (Path(source).name if isinstance(source, str | Path) else "items")
    _check_kind(sniff(source), "jsonl", compression, name, declare)
    with _open_bytes(source, compression) as stream:
        yield from _objects(_Lines(stream, limits, name, compression), name)


def _check_kind(kind: str | None, fmt: str, compression: str | None, name: str, declare: str) -> None:
    """A file is what it is said to be (`sniff`'s `kind`): compressed as declared, Parquet or not."""
    if compression is not None and (compression not in COMPRESSIONS or fmt == "parquet"):
        raise SteerError(f"cannot read a {fmt} file compressed with {compression}", "compression")
    if compression is not None and kind != compression:
        raise SteerError(f"the file is not {compression}-compressed", name)
    if compression is None and kind not in (None, "parquet"):
        raise SteerError(f"the file is {kind}-compressed, and no compression was declared: {declare}", name)
    if fmt == "parquet" and kind != "parquet":
        raise SteerError("is not a Parquet file (it does not start and end with PAR1)", name)
    if fmt != "parquet" and kind == "parquet":
        raise SteerError(f"is a Parquet file, not {fmt.upper()}", name)


def _open_bytes(source: str | Path | IO[bytes], compression: str | None) -> AbstractContextManager[IO[bytes]]:
    """A binary stream of the file's bytes, decompressed as declared (a caller's stream is left open)."""
    if not isinstance(source, str | Path):
        if compression == "gzip":
            return cast(IO[bytes], gzip.GzipFile(fileobj=source, mode="rb"))
        if compression == "bz2":
            return cast(IO[bytes], bz2.BZ2File(source, "rb"))
        if compression == "xz":
            return cast(IO[bytes], lzma.LZMAFile(source, "rb"))
        return nullcontext(source)
    try:
        if compression == "gzip":
            return cast(IO[bytes], gzip.open(source, "rb"))
        if compression == "bz2":
            return cast(IO[bytes], bz2.open(source, "rb"))
        if compression == "xz":
            return cast(IO[bytes], lzma.open(source, "rb"))
        return open(source, "rb")
    except OSError as exc:
        raise SteerError(f"cannot read {source}: {exc.strerror or exc}", str(source)) from None


class _Lines:
    """The lines of a byte stream as text, counted: every byte once decompressed against
    `limits.expanded_bytes`, one row's (`start_row`) against MAX_ROW_BYTES. A line that is not UTF-8 is
    decoded with its bad bytes kept as surrogate escapes and `bad` set, for the row's reader to name the
    column that holds them."""

    def __init__(self, stream: IO[bytes], limits: ReadLimits, name: str, compression: str | None) -> None:
        self.stream = stream
        self.limits = limits
        self.name = name
        self.compression = compression
        self.total = 0
        self.line = 0
        self.row: int | None = None  # None: the header
        self.row_bytes = 0
        self.bad: UnicodeDecodeError | None = None

    def at(self) -> str:
        return self.name if self.row is None else f"{self.name}[{self.row}]"

    def start_row(self, row: int | None) -> None:
        self.row, self.row_bytes, self.bad = row, 0, None

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        budget = MAX_ROW_BYTES - self.row_bytes
        try:
            raw = self.stream.readline(budget + 1)
        except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
            raise SteerError(f"cannot decompress the file ({self.compression}) at line {self.line + 1}: {exc}",
                             self.at()) from None
        if not raw:
            raise StopIteration
        self.line += 1
        self.total += len(raw)
        limit = self.limits.expanded_bytes
        if limit is not None and self.total > limit:
            raise TooLarge(f"expands to more than {limit} bytes", self.name, "bytes", limit)
        self.row_bytes += len(raw)
        if self.row_bytes > MAX_ROW_BYTES:
            what = "the header" if self.row is None else "a row"
            raise SteerError(f"{what} is longer than {MAX_ROW_BYTES} bytes (line {self.line})", self.at())
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self.bad = self.bad or exc
            text = raw.decode("utf-8", "surrogateescape")
        if self.line == 1:
            text = text.removeprefix("\ufeff")
        return text

    def not_utf8(self, column: str | None) -> SteerError:
        assert self.bad is not None
        where = self.at() if column is None else f"{self.at()}.{column}"
        return SteerError(f"is not valid UTF-8 (byte 0x{self.bad.object[self.bad.start]:02x}, line {self.line})",
                          where)


def _csv_rows(lines: _Lines, name: str) -> tuple[list[str], Iterator[dict[str, Any]]]:
    reader = csv.reader(lines, strict=True)  # an unterminated quote, or text after a closing one, is an error
    lines.start_row(None)
    try:
        header = next(reader, None)
    except csv.Error as exc:
        raise SteerError(f"the header line is not valid CSV: {exc}", name) from None
    if header is None:
        raise SteerError("the file is empty", name)
    if lines.bad is not None:
        raise lines.not_utf8(None)

    def rows() -> Iterator[dict[str, Any]]:
        i = 0
        while True:
            lines.start_row(i)
            try:
                cells = next(reader, None)
            except csv.Error as exc:
                raise SteerError(f"is not valid CSV (line {lines.line}): {exc}", lines.at()) from None
            if cells is None:
                return
            if not any(cell.strip() for cell in cells):  # a blank line
                continue
            _count_row(lines, i)
            if len(cells) > len(header):
                raise SteerError(f"has {len(cells)} cells, and the header names {len(header)} columns", lines.at())
            row = dict(zip(header, cells, strict=False))
            if lines.bad is not None:
                raise lines.not_utf8(next((c for c, v in row.items() if _BAD_BYTE.search(v)), None))
            yield row
            i += 1

    return header, rows()


def _count_row(lines: _Lines, row: int) -> None:
    limit = lines.limits.rows
    if limit is not None and row >= limit:
        raise TooLarge(f"has more than {limit} rows", lines.name, "rows", limit)


def _objects(lines: _Lines, name: str) -> Iterator[tuple[int, int, dict[str, Any]]]:
    i = 0
    while True:
        lines.start_row(i)
        text = next(lines, None)
        if text is None:
            return
        if not text.strip():
            continue
        _count_row(lines, i)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            if lines.bad is not None:
                raise lines.not_utf8(None) from None
            raise SteerError(f"line {lines.line} is not valid JSON: {exc.msg} (column {exc.colno})",
                             lines.at()) from None
        except RecursionError:
            raise SteerError(f"line {lines.line} nests too deeply", lines.at()) from None
        except ValueError as exc:  # an integer of more digits than Python converts
            raise SteerError(f"line {lines.line} is not valid JSON: {exc}", lines.at()) from None
        if not isinstance(obj, dict):
            raise SteerError(f"line {lines.line} is not a JSON object", lines.at())
        if lines.bad is not None:
            raise lines.not_utf8(next((k for k, v in obj.items() if _has_bad_byte(k) or _has_bad_byte(v)), None))
        yield i, lines.line, obj
        i += 1


def _has_bad_byte(value: Any) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str) and _BAD_BYTE.search(v):
            return True
        if isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def _jsonl_rows(lines: _Lines, name: str) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """The rows of a JSONL file; its columns are the first object's keys (every row needs the mapped ones)."""
    objects = _objects(lines, name)
    first = next(objects, None)
    if first is None:
        raise SteerError("the sample is empty", name)

    def rows() -> Iterator[dict[str, Any]]:
        yield first[2]
        for _, _, obj in objects:
            yield obj

    return list(first[2]), rows()


def _parquet_rows(stack: ExitStack, path: Path, columns: Columns, limits: ReadLimits,
                  name: str) -> tuple[list[str], Iterator[dict[str, Any]]]:
    """The mapped columns of a Parquet file, PARQUET_BATCH_ROWS rows at a time. Before reading: the rows, the
    mapped columns' pages once decompressed (by the metadata) and their values a row (by the metadata: at
    most MAX_OPTIONS a row group's row on average); then each batch's cells (text as dictionaries: nothing
    repeated is expanded) and decoded bytes, before they become Python objects."""
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    with _arrow_errors("is not a readable Parquet file", lambda: name):
        meta = pq.ParquetFile(path)
        stack.callback(meta.close)
        reader = _parquet_reader(meta, path, columns, limits, name)
        stack.callback(reader.close)
        names = list(meta.schema_arrow.names)
    roles = {column: role for role, column in reversed(asdict(columns).items()) if column in names}

    def rows() -> Iterator[dict[str, Any]]:
        i = expanded = 0
        with _arrow_errors("cannot read the Parquet file", lambda: f"{name}[{i}]"):
            for batch in reader.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=list(roles), use_threads=False):
                if limits.rows is not None and i + batch.num_rows > limits.rows:
                    raise TooLarge(f"has more than {limits.rows} rows", name, "rows", limits.rows)
                dirty = None  # the first row with a cell past its cap, or not UTF-8
                for column, array in zip(batch.schema.names, batch.columns, strict=True):
                    size, first = _scan(_Column(array, roles[column]))
                    expanded += size
                    dirty = first if dirty is None or (first is not None and first < dirty) else dirty
                if limits.expanded_bytes is not None and expanded > limits.expanded_bytes:
                    raise TooLarge(f"expands to more than {limits.expanded_bytes} bytes once decoded", name, "bytes",
                                   limits.expanded_bytes)
                for row in (batch if dirty is None else batch.slice(0, dirty)).to_pylist():
                    yield row
                    i += 1
                if dirty is not None:
                    # The row as make_item is to judge it, an oversized cell standing in by its first
                    # characters (`_Oversized`): it refuses the row where a JSON body's item would be refused.
                    cells = {column: _cells(_Column(array.slice(dirty, 1), roles[column]), f"{name}[{i}].{column}")
                             for column, array in zip(batch.schema.names, batch.columns, strict=True)}
                    yield cells
                    raise SteerError("holds a cell past its limit", f"{name}[{i}]")  # make_item refused it first

    return names, rows()


@contextmanager
def _arrow_errors(message: str, field: Callable[[], str]) -> Iterator[None]:
    """Whatever Arrow raises on an untrusted file (ArrowInvalid, OSError, and from a corrupted footer a
    UnicodeDecodeError, ...) as a SteerError naming `field()` (the row being read)."""
    try:
        yield
    except (SteerError, MemoryError):
        raise
    except Exception as exc:
        raise SteerError(f"{message}: {str(exc)[:300]}", field()) from None


def _parquet_reader(meta: Any, path: Path, columns: Columns, limits: ReadLimits, name: str) -> Any:
    """The reader of the mapped columns, once the metadata says they are within the limits."""
    import pyarrow.parquet as pq

    names = list(meta.schema_arrow.names)
    md = meta.metadata
    mapped = list(dict.fromkeys(column for column in asdict(columns).values() if column in names))
    if limits.rows is not None and md.num_rows > limits.rows:
        raise TooLarge(f"has more than {limits.rows} rows ({md.num_rows})", name, "rows", limits.rows)
    leaves = [i for i in range(md.num_columns)
              if any(md.schema.column(i).path == c or md.schema.column(i).path.startswith(c + ".") for c in mapped)]
    if limits.expanded_bytes is not None:
        pages = sum(md.row_group(g).column(i).total_uncompressed_size
                    for g in range(md.num_row_groups) for i in leaves)
        if pages > limits.expanded_bytes:
            raise TooLarge(f"expands to more than {limits.expanded_bytes} bytes ({pages} in its mapped columns' "
                           "pages)", name, "bytes", limits.expanded_bytes)
    for g in range(md.num_row_groups):
        group = md.row_group(g)
        for i in leaves:
            values = group.column(i).num_values
            if values > max(group.num_rows, 1) * MAX_OPTIONS:
                column = md.schema.column(i).path
                raise SteerError(f"row group {g} holds {values} values in {group.num_rows} rows: more than "
                                 f"{MAX_OPTIONS} a row", f"{name}.{column.split('.')[0]}")
    for column in mapped:
        _check_type(meta.schema_arrow.field(column).type, f"{name}.{column}")
    text_leaves = [md.schema.column(i).path for i in leaves if md.schema.column(i).physical_type == "BYTE_ARRAY"]
    return pq.ParquetFile(path, read_dictionary=text_leaves)


def _check_type(kind: Any, field: str) -> None:
    """A mapped Parquet column holds text, numbers, or a flat list of them."""
    import pyarrow as pa

    if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
        kind = kind.value_type
    if pa.types.is_dictionary(kind):
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind) or pa.types.is_integer(kind) or pa.types.is_floating(kind)
            or pa.types.is_boolean(kind) or pa.types.is_null(kind)):
        raise SteerError(f"holds {kind} values: expected text, numbers or a list of them", field)


# Characters a Parquet text cell of a field may hold (`steer_core.items`' limits); a list's elements are
# options. A cell of more than 4 bytes a character (UTF-8's most) is past its limit before it is decoded.
# Text in place of a list (`Yes|No`) may hold MAX_ROW_BYTES.
_CELL_CHARS = {"question": MAX_QUESTION_CHARS, "id": MAX_ID_CHARS, "answer": MAX_OPTION_CHARS}


class _Column:
    """A Parquet batch's column as its leaf values (a list column's elements), for `_scan` and `_cells`."""

    def __init__(self, array: Any, role: str) -> None:
        import pyarrow as pa

        self.array = array
        self.listed = pa.types.is_list(array.type) or pa.types.is_large_list(array.type) or \
            pa.types.is_fixed_size_list(array.type)
        self.values = array.flatten() if self.listed else array
        self.dictionary = pa.types.is_dictionary(self.values.type)
        kind = self.values.type.value_type if self.dictionary else self.values.type
        self.text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        self.binary = self.text or pa.types.is_binary(kind) or pa.types.is_large_binary(kind)
        self.chars = MAX_OPTION_CHARS if self.listed else _CELL_CHARS.get(role)
        self.cap = MAX_ROW_BYTES if self.chars is None else 4 * self.chars

    def lengths(self) -> Any:
        """Each leaf value's bytes (dictionary values counted by each cell that refers to them)."""
        import pyarrow.compute as pc  # type: ignore[import-untyped]

        if self.dictionary:
            return pc.take(pc.binary_length(self.values.dictionary), self.values.indices)
        return pc.binary_length(self.values)

    def row_of(self, leaf: int) -> int:
        import pyarrow.compute as pc

        return int(pc.list_parent_indices(self.array)[leaf].as_py()) if self.listed else leaf


def _scan(column: _Column) -> tuple[int, int | None]:
    """A batch column's bytes once decoded, and the first row (in the batch) with a cell past its cap or not
    UTF-8 (None: no such row); nothing is made a Python object."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not column.binary:
        return 8 * len(column.values), None
    lengths = column.lengths()
    over = pc.greater(lengths, column.cap)
    first = column.row_of(pc.index(over, True).as_py()) if pc.any(over).as_py() else None
    if column.text:
        try:
            (column.values.dictionary if column.dictionary else column.values).validate(full=True)
        except pa.ArrowInvalid:  # not UTF-8 somewhere: find the first cell that is not, among those within caps
            for k in range(len(column.values)):
                if first is not None and column.row_of(k) >= first:
                    break
                if column.values[k].is_valid and not over[k].as_py() and _not_utf8(column.values[k]) is not None:
                    first = column.row_of(k)
                    break
    return int(pc.sum(lengths).as_py() or 0), first


def _not_utf8(scalar: Any) -> int | None:
    """The first byte of a text scalar that is not UTF-8, or None."""
    import pyarrow as pa

    value = scalar.value if isinstance(scalar, pa.DictionaryScalar) else scalar
    raw = value.cast(pa.binary()).as_py()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return int(raw[exc.start])
    return None


def _cells(column: _Column, field: str) -> Any:
    """One row's cell of a column (a one-row slice) as a Python value: a value past its cap as an
    `_Oversized` stand-in, text that is not UTF-8 refused (as in CSV and JSONL: before the item is judged)."""
    import pyarrow.compute as pc

    if not column.binary:
        return column.array.to_pylist()[0]
    if not column.array[0].is_valid:
        return None
    lengths = column.lengths()
    out: list[Any] = []
    for k in range(len(column.values)):
        where = f"{field}[{k}]" if column.listed else field
        scalar = column.values[k]
        if not scalar.is_valid:
            out.append(None)
        elif lengths[k].as_py() > column.cap:
            if column.chars is None:
                raise SteerError(f"must be at most {column.cap} bytes, got {lengths[k].as_py()}", where)
            if not column.text:
                out.append(b"")  # bytes of any length: make_item refuses them as not text
                continue
            value = scalar.value if hasattr(scalar, "dictionary") else scalar
            prefix = _decoded(pc.utf8_slice_codeunits(value, 0, column.chars + 1))
            if not prefix.strip():  # blank so far: is it blank throughout (by Python's whitespace)?
                prefix += _decoded(pc.utf8_slice_codeunits(pc.utf8_ltrim(value, characters=_WHITESPACE), 0, 1))
            out.append(_Oversized(prefix, int(pc.utf8_length(value).as_py()),
                                  bool(pc.match_substring(value, "\x00").as_py())))
        else:
            bad = _not_utf8(scalar) if column.text else None
            if bad is not None:
                raise SteerError(f"is not valid UTF-8 (byte 0x{bad:02x})", where)
            out.append(scalar.as_py())
    return out if column.listed else out[0]


# What str.strip() strips.
_WHITESPACE = "".join(chr(c) for c in range(0x3000 + 1) if chr(c).isspace())


def _decoded(scalar: Any) -> str:
    return str(scalar.cast("binary").as_py().decode("utf-8", "replace"))


class _Oversized(str):
    """A text cell past its limit, as `make_item` sees it without its being decoded: its first characters,
    its length in characters (`len`) and whether it holds a NUL (`"\x00" in`)."""

    length: int
    nul: bool

    def __new__(cls, prefix: str, length: int, nul: bool) -> _Oversized:
        text = super().__new__(cls, prefix)
        text.length, text.nul = length, nul
        return text

    def __len__(self) -> int:
        return self.length

    def __contains__(self, part: object) -> bool:
        return self.nul if part == "\x00" else super().__contains__(part)  # type: ignore[operator]


def open_table(source: str | Path, split: str = "train") -> Any:
    """A saved Hugging Face dataset (`save_to_disk`), or a hub dataset by name, as a `datasets.Dataset`
    (imported here: it takes seconds to load)."""
    import datasets

    datasets.disable_progress_bars()
    path = Path(source)
    try:
        if not path.exists():  # a hub name: downloads where the machine is online
            return datasets.load_dataset(str(source), split=split)
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets' and the hub's errors vary by version: report the name and the reason
        raise SteerError(f"cannot load the dataset {str(source)!r}: {exc}", "data") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise SteerError(f"no split {split!r}; the dataset has {', '.join(loaded)}", "split")
        return loaded[split]
    return loaded


def cli_flag(role: str) -> str:
    """How a command line maps a field's column: `--question-column`."""
    return f"--{role}-column"


def query_parameter(role: str) -> str:
    """How an HTTP upload maps a field's column: `?question_column=`."""
    return f"?{role}_column="


def items_from_rows(rows: Iterable[Mapping[str, Any]], columns: Columns, column_names: Iterable[str],
                    name: str, mapped_by: Callable[[str], str] = cli_flag,
                    text_cells: bool = False, sparse: bool = False) -> list[OpinionItem]:
    """Rows with the mapped columns as opinion items, made as `rows` yields them; `name` prefixes error
    fields; `mapped_by` names the option that maps a field's column (a command line's flag, an HTTP query
    parameter) in errors. `text_cells`: every cell is text (CSV), so an `answer` that is no option's text
    but an integer is the option's index. `sparse`: a row may hold mapped columns `column_names` (its first
    row's, in JSONL) does not."""
    present = set(column_names)
    for role in ("question", "options"):
        column = getattr(columns, role)
        if column not in present:
            raise SteerError(f"no column {column!r} in {name} (columns: {', '.join(sorted(present))}); "
                             f"map it with {mapped_by(role)}", f"{role}_column")
    if columns.target not in present and columns.answer not in present:
        raise SteerError(f"{name} has neither a {columns.target!r} nor an {columns.answer!r} column; map one "
                         f"with {mapped_by('target')} or {mapped_by('answer')}", "target_column")
    source = {field: column for field, column in asdict(columns).items() if sparse or column in present}
    items = []
    for i, row in enumerate(rows):
        at = f"{name}[{i}]"
        values = {field: _cell(row.get(column)) for field, column in source.items()}
        try:
            for field in ("options", "target", "ordinal"):
                values[field] = _listed(values.get(field), field in ("target", "ordinal"), f"{at}.{source.get(field)}")
            if text_cells:
                values["answer"] = _answer(values.get("answer"), values.get("options"))
            items.append(make_item(values.get("question"), values.get("options"), target=values.get("target"),
                                   answer=values.get("answer"), ordinal=values.get("ordinal"), id=values.get("id"),
                                   field=at))
        except SteerError as exc:
            # make_item names the interchange field; name the source column instead
            field = exc.field or at
            for interchange, column in source.items():
                if field == f"{at}.{interchange}" or field.startswith(f"{at}.{interchange}["):
                    field = f"{at}.{column}" + field.removeprefix(f"{at}.{interchange}")
                    break
            raise SteerError(exc.message, field) from None
    if not items:
        raise SteerError("the sample is empty", name)
    return items


def load_table(source: str | Path, fmt: str, columns: Columns | None = None, split: str = "train") -> list[OpinionItem]:
    """Opinion items from a table file (CSV, JSONL, Parquet: `read_table`, its compression by its name's
    suffix, no limit on its rows or size), a saved dataset or a hub dataset name (`hf`)."""
    if fmt in ("csv", "jsonl", "parquet"):
        return read_table(source, fmt, columns, compression=compression_of(source))
    if fmt != "hf":
        raise SteerError(f"unknown table format {fmt!r}; choose one of {', '.join(TABLE_FORMATS)}", "format")
    table = open_table(source, split)
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
        except (ValueError, RecursionError):  # not JSON, nested too deep, an integer of too many digits
            raise SteerError("is not a valid JSON array", field) from None
    parts = [p.strip() for p in text.split("|")]
    if not numbers:
        return parts
    try:
        return [float(p) for p in parts]
    except ValueError:
        raise SteerError(f"expected numbers separated by '|', got {shown(value)}", field) from None


_INTEGER = re.compile(r"\s*[+-]?\d{1,3}\s*")


def _answer(value: Any, options: Any) -> Any:
    """A CSV answer cell: the option's text, or its index where no option has that text."""
    if isinstance(value, str) and _INTEGER.fullmatch(value) and \
            not (isinstance(options, list) and value.strip() in [o.strip() for o in options if isinstance(o, str)]):
        return int(value)
    return value
