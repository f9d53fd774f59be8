"""Opinion items and the loaders that make them.

An `OpinionItem` is a survey question with its ordered options, an ordinal position per option, and a
target distribution over the options (one-hot for one person's answer). The JSONL item format is the
project's interchange format:

    {"id"?, "question", "options", "ordinal"?, "target"?: [probabilities], "answer"?: index or option text}

with exactly one of `target` and `answer`.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO, TypeAlias

from steer_core.errors import SteerError

if TYPE_CHECKING:
    import numpy as np

    from steer_core.tables import Columns

# One answer distribution over an item's options, as the model gives it or as a list.
# (A string: numpy is imported for type checking only, so reading items, and the command line's --help, stay
# free of it.)
Distribution: TypeAlias = "Sequence[float] | np.ndarray"

MAX_OPTIONS = 26  # one letter each
REFUSAL_OPTIONS = {"refused"}
_TARGET_TOLERANCE = 1e-3


@dataclass(frozen=True)
class OpinionItem:
    """`contrast`, when set, is the pooled answer distribution of the subjects this item's target is to be
    told apart from (other groups on the same question); group-relative objectives read it."""

    question: str
    options: tuple[str, ...]
    target: tuple[float, ...]
    ordinal: tuple[float, ...]
    id: str | None = None
    contrast: tuple[float, ...] | None = None

    @property
    def answer(self) -> int:
        """Index of the most likely option of the target (the person's answer when one-hot)."""
        return max(range(len(self.target)), key=self.target.__getitem__)

    @property
    def is_one_hot(self) -> bool:
        return max(self.target) >= 1.0 - _TARGET_TOLERANCE

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"question": self.question, "options": list(self.options),
                               "ordinal": list(self.ordinal), "target": list(self.target)}
        if self.id is not None:
            out = {"id": self.id, **out}
        if self.contrast is not None:
            out["contrast"] = list(self.contrast)
        return out


def make_item(question: Any, options: Any, target: Any = None, answer: Any = None, ordinal: Any = None,
              id: Any = None, field: str = "item") -> OpinionItem:
    """Validate raw fields into an `OpinionItem`; errors name `field.<name>`."""
    if not isinstance(question, str) or not question.strip():
        raise SteerError("must be a non-empty string", f"{field}.question")
    if not isinstance(options, Sequence) or isinstance(options, str) or \
            not all(isinstance(o, str) and o.strip() for o in options):
        raise SteerError("must be a list of non-empty strings", f"{field}.options")
    if len(options) < 2:
        raise SteerError(f"needs at least 2 options, got {len(options)}", f"{field}.options")
    if len(options) > MAX_OPTIONS:
        raise SteerError(f"at most {MAX_OPTIONS} options are supported, got {len(options)}", f"{field}.options")
    n = len(options)
    if (target is None) == (answer is None):
        raise SteerError("give exactly one of 'target' and 'answer'", f"{field}.target")
    if answer is not None:
        if isinstance(answer, bool):
            raise SteerError("must be an option index or the option's text", f"{field}.answer")
        if isinstance(answer, str):
            if answer not in options:
                raise SteerError(f"{answer!r} is not one of the options", f"{field}.answer")
            answer = list(options).index(answer)
        if not isinstance(answer, int) or not 0 <= answer < n:
            raise SteerError(f"must be an option index in 0..{n - 1} or the option's text", f"{field}.answer")
        probs = [1.0 if k == answer else 0.0 for k in range(n)]
    else:
        probs = _numbers(target, n, f"{field}.target")
        if any(p < 0 for p in probs):
            raise SteerError("probabilities must not be negative", f"{field}.target")
        total = sum(probs)
        if abs(total - 1.0) > _TARGET_TOLERANCE:
            raise SteerError(f"must sum to 1, sums to {total:.4f}", f"{field}.target")
        probs = [p / total for p in probs]
    positions = list(range(1, n + 1)) if ordinal is None else _numbers(ordinal, n, f"{field}.ordinal")
    if id is not None and not isinstance(id, str | int):
        raise SteerError("must be a string or an integer", f"{field}.id")
    return OpinionItem(question=question.strip(), options=tuple(o.strip() for o in options),
                       target=tuple(float(p) for p in probs), ordinal=tuple(float(x) for x in positions),
                       id=None if id is None else str(id))


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


def reverse_options(item: OpinionItem) -> OpinionItem:
    """The same item with its options in reverse order (letters re-assigned; target, ordinal and contrast
    permuted with them): a profile that learned letters rather than opinions answers it differently."""
    contrast = None if item.contrast is None else item.contrast[::-1]
    return replace(item, options=item.options[::-1], target=item.target[::-1], ordinal=item.ordinal[::-1],
                   contrast=contrast)


def _numbers(values: Any, n: int, field: str) -> list[float]:
    if not isinstance(values, Sequence) or isinstance(values, str):
        raise SteerError(f"must be a list of {n} numbers", field)
    if len(values) != n:
        raise SteerError(f"has {len(values)} values for {n} options", field)
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise SteerError(f"must be a list of {n} finite numbers", field)
        out.append(float(v))
    return out


def item_from_json(obj: Any, field: str = "item") -> OpinionItem:
    """One object of the JSONL interchange format."""
    if not isinstance(obj, Mapping):
        raise SteerError("must be a JSON object", field)
    allowed = {"id", "question", "options", "ordinal", "target", "answer"}
    unknown = sorted(set(obj) - allowed)
    if unknown:
        raise SteerError(f"unknown field {unknown[0]!r}", f"{field}.{unknown[0]}")
    return make_item(obj.get("question"), obj.get("options"), target=obj.get("target"),
                     answer=obj.get("answer"), ordinal=obj.get("ordinal"), id=obj.get("id"), field=field)


def items_from_json(objs: Iterable[Any], field: str = "items") -> list[OpinionItem]:
    items = [item_from_json(obj, f"{field}[{i}]") for i, obj in enumerate(objs)]
    if not items:
        raise SteerError("the sample is empty", field)
    return items


def load_jsonl(path: str | Path) -> list[OpinionItem]:
    """Items in the JSONL interchange format; errors name the file and line."""
    path = Path(path)
    objs = []
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                objs.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SteerError(f"line {lineno} is not valid JSON: {exc.msg}", str(path)) from None
    return items_from_json(objs, field=path.name)


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


def load_user_answers(path: str | Path, questions: Sequence[OpinionItem] | None = None) -> list[OpinionItem]:
    """Per-user answers: JSONL of `{"question", "options", "answer"}` (the interchange format with
    `answer`), or `{"id", "answer"}` lines that refer to `questions` by id."""
    path = Path(path)
    by_id = {q.id: q for q in questions or []}
    items = []
    with _open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            field = f"{path.name}[{lineno}]"
            if "question" not in obj and obj.get("id") in by_id:
                q = by_id[obj["id"]]
                items.append(make_item(q.question, q.options, answer=obj.get("answer"), ordinal=q.ordinal,
                                       id=q.id, field=field))
            else:
                items.append(item_from_json(obj, field))
    if not items:
        raise SteerError("the sample is empty", str(path))
    return items


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
