"""Training sources: one JSONL or parquet file each, read lazily block by block.

A source holds rows of ``query``, ``passage`` and optional hard negatives ``negative_1`` … ``negative_N``
(the layout of the ML-Embed / F2LLM-v2 data release). Opening a source checks the file and its columns and
builds a small block index (JSONL: the byte offset of every block's first line; parquet: row-group
metadata); the rows themselves are read only when a DataLoader worker needs them, so a corpus never has to
fit in memory.

Rows that cannot be used are not errors: :func:`make_row` returns a skip reason (see ``SKIP_REASONS``),
which the stream counts per source and, under ``data.strict``, turns into a :class:`DataError`. It stays one file
(a data parser, about 450 lines): the JSONL and parquet readers share the block index, the column checks and the
row rules.
"""

from __future__ import annotations

import difflib
import functools
import json
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodules.gettext_corpus import MANIFEST_NAME

TASKS = ("retrieval", "clustering", "classification")
IN_BATCH_TASKS = frozenset({"retrieval"})  # clustering / classification train on their hard negatives only
FORMATS = {".jsonl": "jsonl", ".parquet": "parquet"}
SIDECAR_NAME = "sources.yaml"
SIDECAR_KEYS = ("task", "language")
REQUIRED_FIELDS = ("query", "passage")
NEGATIVE_FIELD = re.compile(r"negative_(\d+)")
UNKNOWN_LANGUAGE = "und"  # BCP 47 "undetermined"

SKIP_REASONS = {
    "malformed": "not a JSON object, or a text field that is not a string",
    "missing_field": "query or passage missing or null",
    "undecodable": "bytes that are not valid UTF-8",
    "empty_text": "query or passage empty or only whitespace",
    "too_few_negatives": "fewer usable hard negatives than the source's negatives per row",
    "duplicate": "same query or passage as an earlier row of the same pool (an in-batch false negative)",
}
NOT_BAD_DATA = frozenset({"duplicate"})  # skipped but never an error under data.strict

# Rows per block, the unit of sharding and random access. Small, because a pool of rows mixes only
# pool_rows / MAX_BLOCK_ROWS places of a file: a sorted file (like the built corpora) needs many.
MAX_BLOCK_ROWS = 16
MIN_BLOCKS = 64  # small sources get smaller blocks so that every shard still gets some
SCAN_CHUNK = 8 << 20
PROBE_LINES = 1000  # a JSONL file's columns are read from its first parseable record among these lines


class DataError(ValueError):
    """Unusable input data; the message names the file (and line or row) and the field.

    ``key`` is the config key to look at (``data.dir``, ``data.sources``, ``data.locales``, ...).
    """

    def __init__(self, message: str, key: str = "data.dir") -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class Row:
    """One usable training example; ``index`` is its 0-based line (JSONL) or row (parquet) in the file."""

    query: str
    passage: str
    negatives: tuple[str, ...]
    index: int

    def length(self) -> int:
        """Characters of the longest text: the batch is padded to its longest text."""
        return max(len(self.query), len(self.passage), *map(len, self.negatives))


@dataclass
class Source:
    """One training source (one file) and how it is used.

    Args:
        name: the source's name (file stem or locale); logged metrics and ``data.caps`` use it.
        path: the JSONL or parquet file.
        format: ``jsonl`` or ``parquet``.
        fields: the field (column) names read, in order: query, passage, then negatives.
        num_rows: lines (JSONL) or rows (parquet) in the file, usable or not.
        blocks: ``[n, 3]`` int64 rows ``(start row, stop row, locator)``; the locator is the byte offset of the
            start line (JSONL) or the row group (parquet).
        group_starts: ``[g + 1]`` block-index boundaries of the groups shuffled as units (parquet row groups,
            read once per pass and shard; JSONL: every block is a group).
        task: ``retrieval`` (hard-negative and in-batch loss), ``clustering`` or ``classification``
            (hard-negative loss only).
        language: a language code for per-language counts (``und`` when unknown).
        bidirectional: a translation source whose query and passage swap in a random half of its batches.
        negatives_per_row: k, the hard negatives drawn per row from its usable ``negative_*`` fields.
        cap: at most this many rows per pass (``None``: all); also caps the size used for sampling.

    Example:
        >>> source = open_source(Path("data/msmarco.parquet"))
        >>> source.num_rows, source.fields[:2], source.num_negative_fields
        (500000, ('query', 'passage'), 24)
    """

    name: str
    path: Path
    format: str
    fields: tuple[str, ...]
    num_rows: int
    blocks: np.ndarray
    group_starts: np.ndarray
    task: str = "retrieval"
    language: str = UNKNOWN_LANGUAGE
    bidirectional: bool = False
    negatives_per_row: int = 0
    cap: int | None = None
    key: int = field(init=False)

    def __post_init__(self) -> None:
        # Seeds derive from the name, not the source's position, so adding a source leaves the others' order.
        self.key = zlib.crc32(self.name.encode("utf-8"))

    @property
    def num_negative_fields(self) -> int:
        return len(self.fields) - 2

    @property
    def size(self) -> int:
        """Rows per pass: the sampling weight's base."""
        return self.num_rows if self.cap is None else min(self.num_rows, self.cap)

    @property
    def in_batch(self) -> bool:
        return self.task in IN_BATCH_TASKS

    def where(self, index: int) -> str:
        return f"{self.path}:{index + 1}" if self.format == "jsonl" else f"{self.path} row {index}"

    def read(self, start: int, stop: int, locator: int) -> list[tuple[int, tuple | str]]:
        """``(row index, field values or a skip reason)`` for rows ``[start, stop)`` of one block (its
        ``locator`` from :attr:`blocks`); blank lines are left out."""
        if self.format == "jsonl":
            return _read_jsonl_block(self.path, start, stop, locator, self.fields)
        columns = _read_row_group(self.path, locator, self.fields)
        first = start - int(self.blocks[self.group_starts[locator], 0])  # the row group's first row
        return [(start + i, values)
                for i, values in enumerate(zip(*(column[first: first + stop - start] for column in columns)))]


# ---------------------------------------------------------------------------
# Opening files
# ---------------------------------------------------------------------------


def open_source(path: Path, name: str | None = None, fields: tuple[str, str] | None = None, **usage) -> Source:
    """Checks a JSONL or parquet file and indexes its blocks.

    Args:
        path: the file; its suffix picks the format.
        name: the source name (default: the file stem).
        fields: ``(query field, passage field)`` to read instead of ``query`` / ``passage`` (negatives are then
            not read), e.g. ``("xx", "en")`` for the built-in translation corpora.
        usage: further :class:`Source` attributes (task, language, bidirectional, ...).

    Raises:
        DataError: missing or empty file, unknown format, or a required field missing (names path and field).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    file_format = FORMATS.get(path.suffix)
    if file_format is None:
        raise DataError(f"{path}: unknown format {path.suffix!r}; expected one of {', '.join(FORMATS)}")
    opener = _open_jsonl if file_format == "jsonl" else _open_parquet
    num_rows, available, blocks, group_starts = opener(path)
    required = fields or REQUIRED_FIELDS
    for required_field in required:
        if required_field not in available:
            what = "first record" if file_format == "jsonl" else "columns"
            raise DataError(f"{path}: missing required field {required_field!r} "
                            f"({what}: {', '.join(available) or 'none'})")
    if file_format == "parquet":
        _check_text_columns(path, required)
    negatives = () if fields else tuple(sorted((f for f in available if NEGATIVE_FIELD.fullmatch(f)),
                                               key=lambda f: int(f.split("_")[1])))
    return Source(name or path.stem, path, file_format, (*required, *negatives), num_rows, blocks, group_starts,
                  **usage)


def _block_rows(num_rows: int) -> int:
    return max(1, min(MAX_BLOCK_ROWS, num_rows // MIN_BLOCKS))


def _open_jsonl(path: Path) -> tuple[int, list[str], np.ndarray, np.ndarray]:
    """Line count, fields of the first parseable record, blocks of up to MAX_BLOCK_ROWS lines (one per group)."""
    num_lines, ends_with_newline = 0, True
    with path.open("rb") as file:
        while chunk := file.read(SCAN_CHUNK):
            num_lines += chunk.count(b"\n")
            ends_with_newline = chunk.endswith(b"\n")
    num_lines += not ends_with_newline
    available = _jsonl_fields(path)
    rows = _block_rows(num_lines)
    # Byte offsets of lines 0, rows, 2·rows, ...: newline positions found chunk by chunk, vectorised.
    offsets, line, position = [np.zeros(1, dtype=np.int64)], 0, 0
    with path.open("rb") as file:
        while chunk := file.read(SCAN_CHUNK):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == ord("\n"))
            starts = line + 1 + np.arange(len(newlines))  # line index starting after each newline
            chosen = (starts % rows == 0) & (starts < num_lines)
            offsets.append(position + newlines[chosen] + 1)
            line += len(newlines)
            position += len(chunk)
    starts = np.arange(0, num_lines, rows, dtype=np.int64)
    blocks = np.stack([starts, np.minimum(starts + rows, num_lines), np.concatenate(offsets)], axis=1)
    return num_lines, available, blocks, np.arange(len(blocks) + 1, dtype=np.int64)


def _jsonl_fields(path: Path) -> list[str]:
    first_error = None
    with path.open("rb") as file:
        for number, line in enumerate(file, start=1):
            if number > PROBE_LINES:
                break
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                first_error = first_error or f"line {number}: {error}"
                continue
            if isinstance(record, dict):
                return list(record)
            first_error = first_error or f"line {number}: a JSON {type(record).__name__}, not an object"
    if first_error is None:
        raise DataError(f"{path}: empty file (no records)")
    raise DataError(f"{path}: no JSON object in the first {PROBE_LINES} lines ({first_error})")


def _open_parquet(path: Path) -> tuple[int, list[str], np.ndarray, np.ndarray]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (installed with mlflow)") from None
    try:
        metadata = pq.ParquetFile(path).metadata
    except Exception as error:  # pyarrow raises several types for a corrupt or non-parquet file
        raise DataError(f"{path}: not a readable parquet file ({error})") from None
    if metadata.num_rows == 0:
        raise DataError(f"{path}: empty file (no rows)")
    rows = _block_rows(metadata.num_rows)
    blocks, group_starts, first = [], [0], 0
    for group in range(metadata.num_row_groups):
        size = metadata.row_group(group).num_rows
        blocks += [(start, min(start + rows, first + size), group) for start in range(first, first + size, rows)]
        group_starts.append(len(blocks))  # an empty row group is an empty range of blocks
        first += size
    return (metadata.num_rows, list(metadata.schema.to_arrow_schema().names),
            np.array(blocks, dtype=np.int64).reshape(-1, 3), np.array(group_starts, dtype=np.int64))


def _check_text_columns(path: Path, columns: tuple[str, ...]) -> None:
    """A parquet column read as text must hold strings (or UTF-8 bytes); any other type makes every row unusable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.ParquetFile(path).schema_arrow
    for column in columns:
        column_type = schema.field(column).type
        if pa.types.is_dictionary(column_type):
            column_type = column_type.value_type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)
                or pa.types.is_binary(column_type) or pa.types.is_large_binary(column_type)):
            raise DataError(f"{path}: column {column!r} has type {column_type}; text columns must be string")


# ---------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------


def _read_jsonl_block(path: Path, start: int, stop: int, offset: int,
                      fields: tuple[str, ...]) -> list[tuple[int, tuple | str]]:
    rows = []
    with path.open("rb") as file:
        file.seek(offset)
        for index in range(start, stop):
            line = file.readline()
            if line.strip():
                rows.append((index, _parse_json_line(line, fields)))
    return rows


def _parse_json_line(line: bytes, fields: tuple[str, ...]) -> tuple | str:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "undecodable"
    try:
        record = json.loads(text)
    except ValueError:
        return "malformed"
    if not isinstance(record, dict):
        return "malformed"
    return tuple(record.get(name) for name in fields)


@functools.lru_cache(maxsize=4)
def _read_row_group(path: Path, group: int, fields: tuple[str, ...]) -> tuple[list, ...]:
    """One decoded row group (its text columns only); a few stay cached per worker process."""
    import pyarrow.parquet as pq

    table = pq.ParquetFile(path).read_row_group(group, columns=list(fields))
    return tuple(table.column(name).to_pylist() for name in fields)


def _text(value) -> str:
    """The text of one field, or raises _Skip with the reason."""
    if value is None:
        raise _Skip("missing_field")
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise _Skip("undecodable") from None
    if not isinstance(value, str):
        raise _Skip("malformed")
    try:
        value.encode("utf-8")  # JSON escapes can produce lone surrogates that no tokenizer accepts
    except UnicodeEncodeError:
        raise _Skip("undecodable") from None
    if not value.strip():
        raise _Skip("empty_text")
    return value


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        self.reason = reason


def make_row(index: int, values: tuple | str, negatives_needed: int) -> Row | str:
    """A :class:`Row` from one row's field values, or the reason to skip it.

    Hard negatives that are missing, empty or undecodable are dropped; the row is skipped only when fewer
    than ``negatives_needed`` remain.
    """
    if isinstance(values, str):
        return values
    try:
        query, passage = _text(values[0]), _text(values[1])
    except _Skip as skip:
        return skip.reason
    negatives = []
    for value in values[2:]:
        try:
            negatives.append(_text(value))
        except _Skip:
            continue
    if len(negatives) < negatives_needed:
        return "too_few_negatives"
    return Row(query, passage, tuple(negatives), index)


# ---------------------------------------------------------------------------
# Finding sources
# ---------------------------------------------------------------------------


def list_folder(directory: Path) -> dict[str, Path]:
    """``{source name: file}`` for every ``*.jsonl`` / ``*.parquet`` file directly in ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such directory (data.dir must hold *.parquet / *.jsonl files)")
    files: dict[str, Path] = {}
    for path in sorted(directory.iterdir()):
        if path.suffix in FORMATS and path.is_file():
            if path.stem in files:
                raise DataError(f"{directory}: two files for source {path.stem!r} ({files[path.stem].name}, "
                                f"{path.name}); one source per file name")
            files[path.stem] = path
    if not files:
        raise DataError(f"{directory}: no *.parquet or *.jsonl files")
    return files


def check_names(names, available, key: str, where: str) -> None:
    """Raises DataError naming ``key`` and the closest available names for any unknown name."""
    unknown = [name for name in names if name not in available]
    if unknown:
        hints = "; ".join(f"{name!r} (closest: {', '.join(difflib.get_close_matches(name, available, n=3)) or 'none'})"
                          for name in unknown)
        raise DataError(f"unknown source(s) {hints}; {len(available)} available in {where}", key=key)


def read_sidecar(directory: Path, names) -> dict[str, dict[str, str]]:
    """The optional ``sources.yaml`` of a folder: ``{source: {task: ..., language: ...}}``, checked."""
    import yaml

    path = Path(directory) / SIDECAR_NAME
    if not path.is_file():
        return {}
    try:
        declared = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as error:
        raise DataError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(declared, dict):
        raise DataError(f"{path}: expected a mapping of source name to {{task, language}}")
    check_names(declared, list(names), key=str(path), where=str(directory))
    for name, entry in declared.items():
        if not isinstance(entry, dict) or set(entry) - set(SIDECAR_KEYS):
            raise DataError(f"{path}: entry {name!r} must be a mapping with keys among {', '.join(SIDECAR_KEYS)}; "
                            f"got {entry!r}")
        if entry.get("task", TASKS[0]) not in TASKS:
            raise DataError(f"{path}: {name}.task is {entry['task']!r}; choose one of {', '.join(TASKS)}")
    return {name: {key: str(value) for key, value in entry.items()} for name, entry in declared.items()}


def folder_sources(directory: Path, names: list[str] | None = None) -> dict[str, Source]:
    """Opens the files of a data folder (all of them, or ``names``), with tasks and languages from its sidecar."""
    files = list_folder(directory)
    if names is not None:
        check_names(names, list(files), key="data.sources", where=str(directory))
    declared = read_sidecar(directory, files)
    return {name: open_source(files[name], **declared.get(name, {}))
            for name in (names if names is not None else files)}


def built_locales(directory: Path) -> list[str] | None:
    """Locales with train pairs in a built translation corpus, from its manifest (None: nothing built there)."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return sorted(locale for locale, counts in manifest["locales"].items() if counts["train"])


def corpus_sources(directory: Path, locales: list[str], direction: str) -> dict[str, Source]:
    """The train splits of a built translation corpus (gettext or django): one bidirectional source per locale.

    ``direction``: ``xx2en`` (query in the locale, passage English), ``en2xx``, or ``both``.
    """
    directory = Path(directory)
    available = built_locales(directory)
    if available is None:
        raise DataError(f"{directory / MANIFEST_NAME}: no built corpus here")
    check_names(locales, available, key="data.locales", where=f"{directory} (train split)")
    fields = ("en", "xx") if direction == "en2xx" else ("xx", "en")
    return {locale: open_source(directory / "train" / f"{locale}.jsonl", locale, fields, language=locale,
                                bidirectional=direction == "both")
            for locale in locales}
