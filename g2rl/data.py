"""Prompt/answer data: JSONL files, ``datasets`` directories and hub names.

The built-in tasks (``--data builtin``) live in :mod:`g2rl.tasks`, not here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Example", "load_examples", "encode_prompt"]


@dataclass(frozen=True)
class Example:
    """One problem: the prompt text and its gold answer (as a string)."""

    prompt: str
    answer: str


def _field(record: Any, name: str, where: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if name not in record:
        raise KeyError(f"{where}: missing field {name!r} (fields present: {sorted(record)})")
    value = record[name]
    if value is None:
        raise ValueError(f"{where}: field {name!r} is null")
    return value if isinstance(value, str) else str(value)


def _load_jsonl(
    path: Path, prompt_field: str, answer_field: str, limit: int | None
) -> list[Example]:
    out: list[Example] = []
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if limit is not None and len(out) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{where}: malformed JSON ({exc.msg})") from exc
            out.append(
                Example(_field(record, prompt_field, where), _field(record, answer_field, where))
            )
    return out


def _load_json_array(
    path: Path, prompt_field: str, answer_field: str, limit: int | None
) -> list[Example]:
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg})") from exc
    out = []
    for i, record in enumerate(records[:limit] if limit is not None else records):
        where = f"{path}, item {i}"
        prompt = _field(record, prompt_field, where)
        out.append(Example(prompt, _field(record, answer_field, where)))
    return out


def _from_dataset(ds: Any, source: str, split: str | None, prompt_field: str,
                  answer_field: str, limit: int | None) -> list[Example]:
    # DatasetDict (mapping of splits) -> pick the split.
    import datasets

    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(ds.keys())
        if split is None:
            if len(splits) == 1:
                split = splits[0]
            else:
                raise ValueError(f"{source}: has splits {splits}; choose one with a split option")
        if split not in splits:
            raise ValueError(f"{source}: no split {split!r} (available: {splits})")
        ds = ds[split]
    columns = list(ds.column_names)
    for name in (prompt_field, answer_field):
        if name not in columns:
            raise KeyError(f"{source}: missing field {name!r} (columns: {columns})")
    if limit is not None and limit < len(ds):
        ds = ds.select(range(limit))
    prompts, answers = ds[prompt_field], ds[answer_field]
    out = []
    for i, (p, a) in enumerate(zip(prompts, answers, strict=True)):
        if p is None or a is None:
            raise ValueError(f"{source}: row {i} has a null {prompt_field!r} or {answer_field!r}")
        out.append(Example(str(p), str(a)))
    return out


def _looks_like_path(source: str) -> bool:
    return (
        source.endswith((".jsonl", ".json"))
        or source.startswith((".", "/", "~"))
        or source.count("/") > 1
        or "\\" in source
    )


def load_examples(
    source: str,
    *,
    split: str | None = None,
    limit: int | None = None,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
) -> list[Example]:
    """Load prompt/answer examples from ``source``.

    ``source`` is a ``.jsonl`` file (one JSON object per line; a ``.json`` file may also hold
    one array of objects), a directory written by
    ``datasets`` (``save_to_disk``; a ``DatasetDict`` needs ``split`` unless it has one split),
    or a hub dataset name (needs a network; ``split`` defaults to ``"train"``).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: malformed JSONL (with file and line number), bad split, null values.
        KeyError: a missing prompt/answer field (with file, line and field name).
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix not in (".jsonl", ".json"):
            raise ValueError(f"{source}: unsupported file type (expected .jsonl)")
        if path.suffix == ".json" and path.read_text(encoding="utf-8").lstrip().startswith("["):
            return _load_json_array(path, prompt_field, answer_field, limit)
        return _load_jsonl(path, prompt_field, answer_field, limit)
    if path.is_dir():
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{source}: directory is not a dataset saved with datasets.save_to_disk ({exc})"
            ) from exc
        return _from_dataset(ds, source, split, prompt_field, answer_field, limit)
    if _looks_like_path(source):
        raise FileNotFoundError(f"dataset not found: {source}")
    import datasets

    try:
        ds = datasets.load_dataset(source, split=split or "train")
    except Exception as exc:  # noqa: BLE001 - network/hub errors vary widely
        raise FileNotFoundError(
            f"dataset {source!r} is neither a local file/directory nor loadable from the "
            f"Hugging Face hub (no network?): {type(exc).__name__}: {exc}"
        ) from exc
    return _from_dataset(ds, source, split, prompt_field, answer_field, limit)


def encode_prompt(tokenizer: Any, prompt: str, system_prompt: str | None) -> list[int]:
    """Token ids of a prompt, ready for generation.

    Uses the tokenizer's chat template (with the generation prompt) when it has one, else the
    plain text ``system_prompt + "\\n\\n" + prompt`` (or just ``prompt``).
    """
    if getattr(tokenizer, "chat_template", None):
        messages = []
        if system_prompt:
            messages.append({"role": "system", "content": system_prompt})
        messages.append({"role": "user", "content": prompt})
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=False
        )
        if hasattr(ids, "keys"):  # BatchEncoding in some versions
            ids = ids["input_ids"]
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if ids and isinstance(ids[0], list):
            ids = ids[0]
        return [int(i) for i in ids]
    text = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
    return [int(i) for i in tokenizer.encode(text, add_special_tokens=True)]
