"""The loaders that make opinion items (`steer_core.items`) from JSONL, OpinionsQA, CAA and persona files,
and from tables through `steer_core.tables`.

An `OpinionItem` is a survey question with its ordered options, an ordinal position per option, and a
target distribution over the options (one-hot for one person's answer). The JSONL item format is the
project's interchange format:

    {"id"?, "question", "options", "ordinal"?, "target"?: [probabilities], "answer"?: index or option text,
     "contrast"?: [probabilities]}

with exactly one of `target` and `answer`; `contrast` is the pooled answers of the subjects to be told apart
from (`with_contrast`), as `OpinionItem.to_json` writes it.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

from steer_core.errors import SteerError

# The item itself is defined in steer_core.items (the tables' loader makes items without importing this
# module); its names stay importable from here.
from steer_core.items import MAX_OPTIONS as MAX_OPTIONS
from steer_core.items import OpinionItem as OpinionItem
from steer_core.items import make_item as make_item

if TYPE_CHECKING:
    import numpy as np

    from steer_core.tables import Columns

# One answer distribution over an item's options, as the model gives it or as a list.
# (A string: numpy is imported for type checking only, so reading items, and the command line's --help, stay
# free of it.)
Distribution: TypeAlias = "Sequence[float] | np.ndarray"

REFUSAL_OPTIONS = {"refused"}


def question_key(item: OpinionItem) -> tuple[str, tuple[str, ...]]:
    """What makes two subjects' items the same question: its text and its options in order."""
    return item.question, item.options


def with_contrast(items: Sequence[OpinionItem], others: Sequence[Sequence[OpinionItem]]) -> list[OpinionItem]:
    """`items` with `contrast` set to the mean target of the other subjects' items on the same question
    (each subject counts once). An item no other subject answered gets its own target as its contrast:
    there is nothing to tell apart there, so group-relative objectives take no signal from it."""
    pooled: dict[tuple[str, tuple[str, ...]], list[tuple[float, ...]]] = {}
    for sample in others:
        for key, target in {question_key(it): it.target for it in sample}.items():
            pooled.setdefault(key, []).append(target)
    out = []
    for it in items:
        targets = pooled.get(question_key(it))
        contrast = it.target if not targets else tuple(sum(col) / len(targets) for col in zip(*targets, strict=True))
        out.append(replace(it, contrast=contrast))
    return out


def shared_questions(samples: Mapping[str, Sequence[OpinionItem]]) -> dict[str, list[OpinionItem]]:
    """Each sample's items on the questions every sample answered (`question_key`), in the first sample's
    order, so item i of every sample is the same question (what a population learns from). Raises a
    `SteerError` naming the sample that shares the fewest questions with the first when none is shared."""
    keyed = {name: {question_key(it): it for it in items} for name, items in samples.items()}
    if not keyed:
        return {}
    first = next(iter(keyed.values()))
    shared = [key for key in first if all(key in answers for answers in keyed.values())]
    if not shared:
        worst = min(keyed, key=lambda name: sum(key in keyed[name] for key in first))
        raise SteerError(f"{worst!r} answered none of the questions the others all answered (same text and "
                         "options)", worst)
    return {name: [answers[key] for key in shared] for name, answers in keyed.items()}


def reverse_options(item: OpinionItem) -> OpinionItem:
    """The same item with its options in reverse order (letters re-assigned; target, ordinal and contrast
    permuted with them): a profile that learned letters rather than opinions answers it differently."""
    contrast = None if item.contrast is None else item.contrast[::-1]
    return replace(item, options=item.options[::-1], target=item.target[::-1], ordinal=item.ordinal[::-1],
                   contrast=contrast)


def item_from_json(obj: Any, field: str = "item") -> OpinionItem:
    """One object of the JSONL interchange format."""
    if not isinstance(obj, Mapping):
        raise SteerError("must be a JSON object", field)
    allowed = {"id", "question", "options", "ordinal", "target", "answer", "contrast"}
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise SteerError(f"unknown field {unknown[0]!r}", f"{field}.{unknown[0]}")
    return make_item(obj.get("question"), obj.get("options"), target=obj.get("target"),
                     answer=obj.get("answer"), ordinal=obj.get("ordinal"), id=obj.get("id"),
                     contrast=obj.get("contrast"), field=field)


def items_from_json(objs: Iterable[Any], field: str = "items") -> list[OpinionItem]:
    items = [item_from_json(obj, f"{field}[{i}]") for i, obj in enumerate(objs)]
    if not items:
        raise SteerError("the sample is empty", field)
    return items


def load_jsonl(path: str | Path) -> list[OpinionItem]:
    """Items in the JSONL interchange format, read a line at a time (`steer_core.tables.jsonl_objects`: a
    line at most MAX_ROW_BYTES, UTF-8, gzip, bz2 or xz by the name's suffix); errors name the file and row
    (`file.jsonl[3].options`) and the message the line."""
    from steer_core.tables import compression_of, jsonl_objects

    path = Path(path)
    if not path.is_file():
        raise SteerError(f"cannot read {path}: no such file", str(path))
    items = [item_from_json(obj, f"{path.name}[{row}]")
             for row, _, obj in jsonl_objects(path, compression=compression_of(path))]
    if not items:
        raise SteerError("the sample is empty", path.name)
    return items


def items_from_dataset(dataset: Any) -> list[OpinionItem]:
    """A `datasets.Dataset` (or any iterable of dicts) with the interchange format's columns."""
    rows = [{k: v for k, v in dict(row).items() if v is not None} for row in dataset]
    return items_from_json(rows, field="dataset")


def load_opinionsqa(wave_dir: str | Path, attribute: str, group: str) -> list[OpinionItem]:
    """One group's answer distributions from an OpinionsQA wave (`info.csv` + `<ATTR>_data.json`).

    Options and their order come from `info.csv`; the refusal option is dropped and the rest
    renormalized, as in OpinionsQA.
    """
    wave_dir = Path(wave_dir)
    info_path, data_path = wave_dir / "info.csv", wave_dir / f"{attribute}_data.json"
    for p in (info_path, data_path):
        if not p.exists():
            raise SteerError(f"{p} does not exist", "data")
    with _open(data_path) as f:
        counts = json.load(f)
    items = []
    with _open(info_path) as f:
        for row in csv.DictReader(f):
            key = row["key"]
            entry = counts.get(key)
            if entry is None or group not in entry:
                continue
            options = [o for o in ast.literal_eval(row["references"]) if o.strip().lower() not in REFUSAL_OPTIONS]
            ordinal = [float(x) for x in ast.literal_eval(row["option_ordinal"])]
            group_counts = entry[group]
            weights = [float(group_counts.get(o, 0.0)) for o in options]
            if len(ordinal) != len(options) or sum(weights) <= 0 or len(options) < 2:
                continue
            total = sum(weights)
            items.append(make_item(row["question"], options, target=[w / total for w in weights],
                                   ordinal=ordinal, id=key, field=f"{info_path}:{key}"))
    if not items:
        raise SteerError(f"no questions for group {group!r} of {attribute} in {wave_dir}", "group")
    return items


def opinionsqa_groups(wave_dir: str | Path, attribute: str) -> list[str]:
    with _open(Path(wave_dir) / f"{attribute}_data.json") as f:
        counts = json.load(f)
    first = next(iter(counts.values()))
    return [k for k in first if k not in ("MC_options", "question_text")]


_CHOICE = re.compile(r"^\s*\(([A-Z])\)\s*(.*)$")


def load_caa(path: str | Path) -> list[OpinionItem]:
    """CAA A/B data: each question becomes a two-option item whose answer is the matching behaviour."""
    path = Path(path)
    with _open(path) as f:
        rows = json.load(f)
    items = []
    for i, row in enumerate(rows):
        field = f"{path.name}[{i}]"
        text = row["question"]
        stem, _, choices = text.rpartition("Choices:") if "Choices:" in text else (text, "", "")
        options, letters = [], []
        for line in choices.splitlines():
            m = _CHOICE.match(line)
            if m:
                letters.append(m.group(1))
                options.append(m.group(2).strip())
            elif options and line.strip():
                options[-1] += " " + line.strip()
        if len(options) < 2:  # choices inline in the question, e.g. "\n (A) ...\n (B) ..."
            parts = re.split(r"\n\s*\(([A-Z])\)\s*", text)
            stem, letters, options = parts[0], parts[1::2], [p.strip() for p in parts[2::2]]
        matching = row["answer_matching_behavior"].strip().strip("()")
        if matching not in letters:
            raise SteerError(f"answer_matching_behavior {matching!r} is not a choice", field)
        items.append(make_item(stem.strip(), options, answer=letters.index(matching), id=str(i), field=field))
    if not items:
        raise SteerError("the sample is empty", str(path))
    return items


PERSONA_OPTIONS = ("Yes", "No")


def load_persona(path: str | Path) -> list[OpinionItem]:
    """Anthropic persona statements: a Yes/No item whose answer is the matching behaviour."""
    path = Path(path)
    items = []
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            matching = row["answer_matching_behavior"].strip()
            items.append(make_item(row["question"], PERSONA_OPTIONS, answer=matching,
                                   id=str(lineno), field=f"{path.name}[{lineno}]"))
    if not items:
        raise SteerError("the sample is empty", str(path))
    return items


FORMATS = ("jsonl", "csv", "parquet", "hf", "opinionsqa", "caa", "persona")


def load_items(path: str | Path, format: str | None = None, group: str | None = None,
               columns: Columns | None = None, split: str = "train") -> list[OpinionItem]:
    """Load a sample in any supported format. OpinionsQA needs `group` as `ATTRIBUTE:Group`,
    e.g. `POLIDEOLOGY:Liberal`, and `path` the wave directory. CSV, Parquet, saved Hugging Face datasets
    (`hf`; with `format="hf"` a path that does not exist is a hub name) and JSONL with `columns` go
    through `steer_core.tables`."""
    if format == "hf" and not Path(path).exists():
        from steer_core.tables import load_table

        return load_table(str(path), "hf", columns, split)
    path = Path(path)
    if not path.exists():
        raise SteerError(f"{path} does not exist", "data")
    fmt = format or _guess_format(path)
    if fmt in ("csv", "parquet", "hf") or (fmt == "jsonl" and columns is not None):
        from steer_core.tables import load_table

        return load_table(path, fmt, columns, split)
    if fmt == "jsonl":
        return load_jsonl(path)
    if fmt == "persona":
        return load_persona(path)
    if fmt == "caa":
        return load_caa(path)
    if fmt == "opinionsqa":
        if not group or ":" not in group:
            raise SteerError("OpinionsQA needs --group ATTRIBUTE:Group, e.g. POLIDEOLOGY:Liberal", "group")
        attribute, name = group.split(":", 1)
        return load_opinionsqa(path, attribute, name)
    raise SteerError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}", "format")


def _guess_format(path: Path) -> str:
    if path.is_dir():
        saved = any((path / name).exists() for name in ("dataset_info.json", "dataset_dict.json", "state.json"))
        return "hf" if saved else "opinionsqa"
    if path.suffix == ".json":
        return "caa"
    if path.suffix in (".csv", ".parquet"):
        return path.suffix[1:]
    with _open(path) as f:
        first = next((line for line in f if line.strip()), "{}")
    try:
        obj = json.loads(first)
    except json.JSONDecodeError:
        raise SteerError("not a JSONL file; pass --format", str(path)) from None
    return "persona" if isinstance(obj, dict) and "statement" in obj else "jsonl"


def _open(path: Path) -> TextIO:
    try:
        return open(path, encoding="utf-8")
    except OSError as exc:
        raise SteerError(f"cannot read {path}: {exc.strerror}", str(path)) from None


def sample_hash(items: Sequence[OpinionItem]) -> str:
    """A stable hash of a sample's content (order included)."""
    payload = json.dumps([it.to_json() for it in items], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()
