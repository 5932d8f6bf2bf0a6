"""English↔xx translation pairs mined from compiled GNU gettext catalogs.

Every ``<catalog_dir>/<locale>/LC_MESSAGES/*.mo`` file maps English UI strings
(msgid) to human translations (msgstr). This module reads those catalogs with a
small self-written ``.mo`` parser (Python's ``gettext`` module crashes on
non-UTF-8 and unknown charsets), keeps sentence-like pairs, splits them by
English source into train / probe / test, and writes the result once to disk
as JSON-lines files plus a manifest. It stays one file (a data parser, about 450 lines): the ``.mo`` reader,
the pair filters and the split are one format's pipeline, read in that order.

Layout written by :func:`build_gettext_corpus`::

    out_dir/manifest.json
    out_dir/<split>/<locale>.jsonl   # {"en": ..., "xx": ..., "catalog": ...}
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import json
import os
import re
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

SPLITS = ("train", "probe", "test")
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1

MO_MAGIC = 0x950412DE
MO_HEADER_SIZE = 28  # magic, revision, count, originals offset, translations offset, hash size, hash offset
CONTEXT_SEPARATOR = b"\x04"
PLURAL_SEPARATOR = b"\x00"

ACCELERATOR_MARKS = str.maketrans("", "", "_&")
FORBIDDEN_CHARACTERS = frozenset("%{<")
MIN_ENGLISH_WORDS = 4
MIN_ENGLISH_CHARS = 20
MAX_ENGLISH_CHARS = 300



def filter_description(min_words: int = MIN_ENGLISH_WORDS, min_chars: int = MIN_ENGLISH_CHARS) -> str:
    """The filter in words; stored in the manifest so that a change of the filter invalidates old builds."""
    return (
        "strip whitespace; both sides one line; delete '_' and '&' (accelerator marks) and "
        "collapse runs of spaces; reject '%', '{', '<' on either side; English >= "
        f"{min_words} words and {min_chars}-{MAX_ENGLISH_CHARS} characters; "
        "translation non-empty and different from the English; duplicate pairs within a locale "
        "kept once; near-copies removed from probe and test only"
    )


FILTER_DESCRIPTION = filter_description()

_CHARSET_PATTERN = re.compile(rb"charset=([^\s;]+)", re.IGNORECASE)


@dataclass(frozen=True)
class Pair:
    """One English sentence and its human translation into ``locale``."""

    en: str
    xx: str
    locale: str
    catalog: str  # catalog file stem, e.g. "coreutils"


# ---------------------------------------------------------------------------
# Reading .mo files
# ---------------------------------------------------------------------------


def read_mo(path: str | Path) -> Iterator[tuple[str, str]]:
    """Yields (msgid, msgstr) for every non-header entry, context dropped, first plural form.

    Both sides are decoded with the charset named in the catalog header (utf-8
    when absent or unknown), replacing undecodable bytes. The whole file is
    validated before anything is yielded, so a truncated or corrupt file raises
    :class:`ValueError` naming the file at call time rather than mid-iteration.
    """
    path = Path(path)
    raw_entries = _parse_mo(path.read_bytes(), path)
    encoding = _catalog_encoding(raw_entries)
    return iter(
        [
            (_first_form(msgid, encoding), _first_form(msgstr, encoding))
            for msgid, msgstr in raw_entries
            if msgid  # the empty msgid is the catalog header
        ]
    )


def _parse_mo(data: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    """Returns the raw (msgid, msgstr) byte strings of a .mo file, context removed."""
    if len(data) < MO_HEADER_SIZE:
        raise ValueError(f"{path}: not a .mo file (only {len(data)} bytes)")
    for byte_order in ("<", ">"):
        if struct.unpack_from(byte_order + "I", data)[0] == MO_MAGIC:
            break
    else:
        raise ValueError(f"{path}: not a .mo file (bad magic number)")

    revision, count, originals_offset, translations_offset = struct.unpack_from(
        byte_order + "4I", data, 4
    )
    if revision >> 16 > 1:  # GNU gettext accepts major revisions 0 and 1
        raise ValueError(f"{path}: unsupported .mo revision {revision:#x}")

    def string_table(table_offset: int) -> list[bytes]:
        if table_offset + 8 * count > len(data):
            raise ValueError(f"{path}: truncated or corrupt .mo file (string table out of bounds)")
        lengths_and_offsets = struct.unpack_from(f"{byte_order}{2 * count}I", data, table_offset)
        strings = []
        for length, offset in zip(lengths_and_offsets[::2], lengths_and_offsets[1::2]):
            if offset + length > len(data):
                raise ValueError(f"{path}: truncated or corrupt .mo file (string out of bounds)")
            strings.append(data[offset : offset + length])
        return strings

    msgids = string_table(originals_offset)
    msgstrs = string_table(translations_offset)
    return [
        (msgid.rpartition(CONTEXT_SEPARATOR)[2], msgstr) for msgid, msgstr in zip(msgids, msgstrs)
    ]


def _catalog_encoding(raw_entries: Iterable[tuple[bytes, bytes]]) -> str:
    """Codec name from the header's ``Content-Type: ...; charset=X`` line; utf-8 if unusable."""
    header = next((msgstr for msgid, msgstr in raw_entries if not msgid), b"")
    match = _CHARSET_PATTERN.search(header)
    if match:
        try:
            return codecs.lookup(match.group(1).decode("ascii", "replace")).name
        except LookupError:  # e.g. the template placeholder "CHARSET"
            pass
    return "utf-8"


def _first_form(raw: bytes, encoding: str) -> str:
    """First of the NUL-separated plural forms, decoded without ever raising."""
    return raw.partition(PLURAL_SEPARATOR)[0].decode(encoding, errors="replace")


# ---------------------------------------------------------------------------
# Filtering, splitting, near-copies
# ---------------------------------------------------------------------------


def clean_pair(en: str, xx: str, min_words: int = MIN_ENGLISH_WORDS,
               min_chars: int = MIN_ENGLISH_CHARS) -> tuple[str, str] | None:
    """Applies the strict sentence filter; returns the cleaned pair or None.

    Accelerator marks (``_`` and ``&``) are deleted and the resulting runs of
    spaces collapsed ("Cut & Paste" -> "Cut Paste") before the other checks.
    ``min_words`` / ``min_chars`` bound the English side from below (catalogs of
    short UI strings, such as Django's, need lower bounds to yield anything).
    """
    en, xx = en.strip(), xx.strip()
    if not en or not xx or "\n" in en or "\n" in xx or "\r" in en or "\r" in xx:
        return None
    en = _collapse_spaces(en.translate(ACCELERATOR_MARKS))
    xx = _collapse_spaces(xx.translate(ACCELERATOR_MARKS))
    if not xx or xx == en:
        return None
    if not FORBIDDEN_CHARACTERS.isdisjoint(en) or not FORBIDDEN_CHARACTERS.isdisjoint(xx):
        return None
    if not min_chars <= len(en) <= MAX_ENGLISH_CHARS:
        return None
    if len(en.split()) < min_words:
        return None
    return en, xx


def _collapse_spaces(text: str) -> str:
    return re.sub(r" {2,}", " ", text).strip()


def split_of(en: str, probe_fraction: float = 0.05, test_fraction: float = 0.05) -> str:
    """'train' | 'probe' | 'test' from a stable hash of the English text.

    The split depends on the English text only, so every translation of one
    sentence lands in the same split, whatever the locale or catalog.
    """
    _check_fractions(probe_fraction, test_fraction)
    position = int.from_bytes(hashlib.sha1(en.encode("utf-8")).digest()[:8], "big") / 2**64
    if position < test_fraction:
        return "test"
    if position < test_fraction + probe_fraction:
        return "probe"
    return "train"


def _check_fractions(probe_fraction: float, test_fraction: float) -> None:
    if probe_fraction < 0 or test_fraction < 0 or probe_fraction + test_fraction > 1:
        raise ValueError(
            f"probe_fraction={probe_fraction} and test_fraction={test_fraction} must be "
            "non-negative and sum to at most 1"
        )


def is_near_copy(en: str, xx: str, threshold: float = 0.8) -> bool:
    """True when the translation mostly copies the English (identifiers, brand names)."""
    matcher = difflib.SequenceMatcher(None, en.lower(), xx.lower())
    # The cheap ratios are upper bounds of ratio(); most pairs are rejected by them.
    return (
        matcher.real_quick_ratio() >= threshold
        and matcher.quick_ratio() >= threshold
        and matcher.ratio() >= threshold
    )


# ---------------------------------------------------------------------------
# Building and loading the corpus
# ---------------------------------------------------------------------------


def build_gettext_corpus(
    out_dir: str | Path,
    catalog_dir: str | Path | Sequence[str | Path] = "/usr/share/locale",
    locales: Sequence[str] | None = None,
    probe_fraction: float = 0.05,
    test_fraction: float = 0.05,
    near_copy_threshold: float = 0.8,
    progress: bool = True,
    min_words: int = MIN_ENGLISH_WORDS,
    min_chars: int = MIN_ENGLISH_CHARS,
    source: str = "gettext",
) -> dict:
    """Builds the corpus once and returns the manifest (dict).

    When ``out_dir/manifest.json`` already records the same catalog_dir and
    parameters, it is returned without rebuilding. Otherwise the corpus is
    written to a temporary sibling folder that replaces ``out_dir`` only once
    complete, so an interrupted build never looks finished.

    ``catalog_dir`` may also be a list of ``<locale>/LC_MESSAGES`` roots (one per
    application, as Django ships them); catalogs are then named
    ``<root's parent folder>/<file stem>``, e.g. ``admin/django``. ``source`` is
    the corpus label stored in the manifest.
    """
    _check_fractions(probe_fraction, test_fraction)
    out_dir = Path(out_dir)
    single_root = isinstance(catalog_dir, (str, Path))
    roots = [Path(root).resolve() for root in ([catalog_dir] if single_root else catalog_dir)]
    recorded_catalog_dir = str(roots[0]) if single_root else [str(root) for root in roots]
    parameters = {
        "locales": sorted(set(locales)) if locales is not None else None,
        "probe_fraction": probe_fraction,
        "test_fraction": test_fraction,
        "near_copy_threshold": near_copy_threshold,
        "filter": filter_description(min_words, min_chars),
    }

    existing = read_manifest(out_dir)
    if (
        existing is not None
        and existing.get("catalog_dir") == recorded_catalog_dir
        and existing.get("parameters") == parameters
    ):
        return existing
    if not (out_dir / MANIFEST_NAME).exists() and out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty and holds no {MANIFEST_NAME}; refusing to replace it")

    selected_locales = _select_locales(roots, parameters["locales"])
    catalogs = [
        (locale, catalog, catalog.stem if single_root else f"{root.parent.name}/{catalog.stem}")
        for locale in selected_locales
        for root in roots
        for catalog in sorted((root / locale / "LC_MESSAGES").glob("*.mo"))
    ]

    # locale -> {(en, xx): catalog name}; the first catalog (sorted order) wins for duplicates.
    pairs_by_locale: dict[str, dict[tuple[str, str], str]] = {locale: {} for locale in selected_locales}
    catalogs_failed = []
    for locale, catalog, catalog_name in _progress_bar(catalogs, f"{source} catalogs", enabled=progress):
        try:
            entries = read_mo(catalog)
        except (ValueError, OSError) as error:
            catalogs_failed.append({"path": str(catalog), "error": str(error)})
            continue
        locale_pairs = pairs_by_locale[locale]
        for msgid, msgstr in entries:
            cleaned = clean_pair(msgid, msgstr, min_words, min_chars)
            if cleaned is not None:
                locale_pairs.setdefault(cleaned, catalog_name)

    staging_dir = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(staging_dir, ignore_errors=True)
    try:
        locale_counts, distinct_english = _write_splits(
            staging_dir, pairs_by_locale, probe_fraction, test_fraction, near_copy_threshold
        )
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": source,
            "catalog_dir": recorded_catalog_dir,
            "build_date": datetime.now(timezone.utc).isoformat(),
            "parameters": parameters,
            "catalogs_read": len(catalogs) - len(catalogs_failed),
            "catalogs_failed": catalogs_failed,
            "locales": locale_counts,
            "locales_without_pairs": sorted(set(selected_locales) - set(locale_counts)),
            "distinct_english": distinct_english,
            "content_hash": content_hash(staging_dir),
        }
        (staging_dir / MANIFEST_NAME).write_text(
            json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
        )
        replace_directory(out_dir, staging_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return manifest


def load_split(out_dir: str | Path, split: str, locale: str) -> list[Pair]:
    """Reads ``out_dir/<split>/<locale>.jsonl`` back into :class:`Pair` objects."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    path = Path(out_dir) / split / f"{locale}.jsonl"
    if not path.is_file():
        present = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise FileNotFoundError(
            f"{path} does not exist; locales present in split {split!r}: "
            f"{', '.join(present) if present else 'none'}"
        )
    with path.open(encoding="utf-8") as lines:
        return [
            Pair(en=record["en"], xx=record["xx"], locale=locale, catalog=record["catalog"])
            for record in map(json.loads, lines)
        ]


def _is_english_locale(locale: str) -> bool:
    return locale == "en" or locale.startswith(("en_", "en@"))


def _select_locales(roots: list[Path], requested: list[str] | None) -> list[str]:
    """Non-English locale folders holding LC_MESSAGES (in any root); validates requested names against them."""
    for root in roots:
        if not root.is_dir():
            raise ValueError(f"catalog_dir {root} is not a directory")
    catalog_dir = roots[0] if len(roots) == 1 else [str(root) for root in roots]
    available = sorted({
        entry.name
        for root in roots
        for entry in root.iterdir()
        if (entry / "LC_MESSAGES").is_dir() and not _is_english_locale(entry.name)
    })
    if requested is None:
        return available
    unknown = [locale for locale in requested if locale not in available]
    if unknown:
        hints = "; ".join(
            f"{locale!r}: closest available {difflib.get_close_matches(locale, available, n=5) or 'none'}"
            for locale in unknown
        )
        raise ValueError(
            f"unknown locale(s) under {catalog_dir} ({len(available)} non-English locales "
            f"available): {hints}"
        )
    return requested


def _progress_bar(items: list, description: str, enabled: bool) -> Iterable:
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=description, unit="catalog", disable=not enabled)


def _write_splits(
    target_dir: Path,
    pairs_by_locale: dict[str, dict[tuple[str, str], str]],
    probe_fraction: float,
    test_fraction: float,
    near_copy_threshold: float,
) -> tuple[dict[str, dict[str, int]], dict[str, int]]:
    """Writes the per-split jsonl files; returns per-locale counts and distinct English per split."""
    for split in SPLITS:
        (target_dir / split).mkdir(parents=True)
    split_cache: dict[str, str] = {}  # the same English recurs in many locales
    english_by_split: dict[str, set[str]] = {split: set() for split in SPLITS}
    locale_counts = {}

    for locale, pairs in sorted(pairs_by_locale.items()):
        rows_by_split: dict[str, list[tuple[str, str, str]]] = {split: [] for split in SPLITS}
        near_copies_removed = 0
        for (en, xx), catalog in pairs.items():
            split = split_cache.get(en)
            if split is None:
                split = split_cache[en] = split_of(en, probe_fraction, test_fraction)
            # Near-copies stay in train (harmless) but would inflate evaluation scores.
            if split != "train" and is_near_copy(en, xx, near_copy_threshold):
                near_copies_removed += 1
                continue
            rows_by_split[split].append((en, xx, catalog))
        if not any(rows_by_split.values()):
            continue

        for split, rows in rows_by_split.items():
            if not rows:
                continue
            rows.sort()
            english_by_split[split].update(en for en, _, _ in rows)
            with (target_dir / split / f"{locale}.jsonl").open("w", encoding="utf-8") as out:
                for en, xx, catalog in rows:
                    out.write(json.dumps({"en": en, "xx": xx, "catalog": catalog}, ensure_ascii=False))
                    out.write("\n")
        locale_counts[locale] = {split: len(rows) for split, rows in rows_by_split.items()}
        locale_counts[locale]["near_copies_removed"] = near_copies_removed

    distinct_english = {split: len(english) for split, english in english_by_split.items()}
    return locale_counts, distinct_english


def content_hash(corpus_dir: Path) -> str:
    """sha256 over the relative paths and bytes of all jsonl files, in sorted order."""
    digest = hashlib.sha256()
    for path in sorted(corpus_dir.glob("*/*.jsonl")):
        digest.update(path.relative_to(corpus_dir).as_posix().encode("utf-8") + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def read_manifest(out_dir: Path) -> dict | None:
    """A built corpus' manifest, or None when it is missing or unreadable (the corpus is then rebuilt)."""
    try:
        return json.loads((out_dir / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def replace_directory(destination: Path, finished: Path) -> None:
    """Moves the finished build into place, discarding any previous build."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    if destination.exists():
        previous = destination.with_name(f".{destination.name}.previous-{os.getpid()}")
        destination.rename(previous)
        finished.rename(destination)
        shutil.rmtree(previous)
    else:
        finished.rename(destination)
