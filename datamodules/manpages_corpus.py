"""Translated manual pages paired with their English originals: an out-of-domain probe corpus.

Debian's ``manpages-<lang>`` packages (and many programs' own packages) install gzip'd roff sources under
``<man_dir>/<lang>/man<N>/`` next to the English pages in ``<man_dir>/man<N>/``. A translated page is paired
with the English page of the same file name in the same section. This module reads both with a small parser
of the roff source (:func:`parse_man_page`: the NAME line, and each section's first paragraph) and writes the
result once to disk as JSON-lines files plus a manifest, like the gettext corpus. It stays one file (a data
parser, about 550 lines): the roff parser, the pairing and the split are one format's pipeline.

Layout written by :func:`build_manpage_corpus`::

    out_dir/manifest.json
    out_dir/english/man<N>.jsonl     # every English page of a section that has translations: {"section": "man1",
                                     #   "page": "ls.1", "name": "ls", "summary": ..., "description": ...}
    out_dir/translated/<lang>.jsonl  # {"language": "de", "section": "man1", "page": "ls.1", "summary": ...}

Example:
    ``python -m datamodules.manpages_corpus`` builds ``data/manpages`` from ``/usr/share/man`` and prints the
    pages per language (``make manpages`` installs the translations first).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from datamodules.gettext_corpus import content_hash, is_near_copy, read_manifest, replace_directory

MAN_DIR = "/usr/share/man"
CORPUS_DIR = "data/manpages"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
FILTER_DESCRIPTION = (
    "pages that are .so redirects or symbolic links (aliases of another page) are skipped; a translated page "
    "is kept when the English page of the same section and file name exists, both have a NAME summary, and "
    "the translated summary is not a near-copy (difflib ratio >= 0.8) of the English one"
)

# ---------------------------------------------------------------------------
# Roff text: escapes and macro arguments
# ---------------------------------------------------------------------------

SPECIAL_CHARACTERS = {
    "em": "—", "en": "–", "hy": "-", "mi": "-", "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "aq": "'",
    "dq": '"', "Bq": "„", "bq": "‚", "Fo": "«", "Fc": "»", "fo": "‹", "fc": "›", "co": "©", "rg": "®",
    "tm": "™", "bu": "•", "ga": "`", "aa": "´", "ti": "~", "ha": "^", "ba": "|", "bv": "|", "sl": "/",
    "rs": "\\", "pl": "+", "eq": "=", "mu": "×", "di": "÷", "de": "°", "ss": "ß", ">=": "≥", "<=": "≤",
    "!=": "≠", "->": "→", "<-": "←", "+-": "±", "sc": "§", "ps": "¶", "Eu": "€", "eu": "€", "lB": "[",
    "rB": "]", "lC": "{", "rC": "}", "la": "⟨", "ra": "⟩", "at": "@", "sh": "#", "dd": "‡", "dg": "†",
}
# \(:a, \('e, ...: a base letter with an accent, composed to one character.
ACCENTS = {":": "\u0308", "'": "\u0301", "`": "\u0300", "^": "\u0302", "~": "\u0303", ",": "\u0327", "o": "\u030a"}
# Predefined strings of the man macros (\*(lq, \*R); anything else a page defines with .ds is dropped.
STRINGS = {"lq": "“", "rq": "”", "R": "®", "Tm": "™", "S": "", "Aq": "'"}  # Aq: DocBook's apostrophe
SINGLE_CHARACTER_ESCAPES = {"-": "-", "e": "\\", "E": "\\", "\\": "\\", " ": " ", "~": " ", "0": " ", "t": " ",
                            "'": "'", "`": "`", ".": ".", "_": "_"}

_ESCAPE = re.compile(r"""\\(?:
      "(?P<comment>.*)                                   # comment to the end of the line
    | f(?:\[[^\]]*\]|\(..|.)                             # font change: \fB \f(CW \f[BI]
    | s(?:[-+]?\d+|\([-+]?\d\d|\[[^\]]*\])               # size change: \s-1 \s0
    | [nmgk$](?:\(..|\[[^\]]*\]|.)                       # registers, colours, position marks, macro arguments
    | \((?P<special>..)                                  # special character \(em
    | \[(?P<bracket>[^\]]*)\]                            # special character \[em] \[u00E9]
    | \*(?:\((?P<string2>..)|\[(?P<stringn>[^\]]*)\]|(?P<string1>.))   # predefined string \*(lq \*R
    | [hvwlLxNbDoSRZCXAB](?P<delimiter>.).*?(?P=delimiter)             # escapes with a delimited argument
    | (?P<single>.)                                      # any other one-character escape
    )""", re.VERBOSE)


def _special_character(name: str) -> str:
    if name in SPECIAL_CHARACTERS:
        return SPECIAL_CHARACTERS[name]
    if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name):  # \[u00E9]
        return chr(int(name[1:], 16))
    if len(name) == 2 and name[0] in ACCENTS and name[1].isalpha():  # \(:u -> ü
        return unicodedata.normalize("NFC", name[1] + ACCENTS[name[0]])
    if len(name) == 2 and name[1] in ACCENTS and name[0].isalpha():  # groff's \[u:] spelling order
        return unicodedata.normalize("NFC", name[0] + ACCENTS[name[1]])
    return ""


def _replace_escape(match: re.Match) -> str:
    if match["comment"] is not None:
        return ""
    if match["special"] is not None or match["bracket"] is not None:
        return _special_character(match["special"] or match["bracket"])
    string = match["string2"] or match["stringn"] or match["string1"]
    if string is not None:
        return STRINGS.get(string, "")
    if match["single"] is not None:
        return SINGLE_CHARACTER_ESCAPES.get(match["single"], "")  # \& \| \^ \c \% ...: nothing printed
    return ""  # fonts, sizes, registers, motions


def roff_text(line: str) -> str:
    """A line of roff text as printed: escapes replaced (``\\-`` → ``-``, ``\\(em`` → ``—``, ``\\(:u`` → ``ü``)
    or removed (fonts, sizes, zero-width marks, comments), runs of whitespace collapsed.

    Example:
        >>> roff_text(r"\\fBls\\fP \\- list \\fIdirectory\\fR contents \\(em fast")
        'ls - list directory contents — fast'
    """
    return " ".join(_ESCAPE.sub(_replace_escape, line).split())


_ARGUMENT = re.compile(r'"((?:[^"]|"")*)"?|(\S+)')


def macro_arguments(arguments: str) -> list[str]:
    """Splits a macro's argument string the way roff does: blanks separate, ``"..."`` quotes (``""`` inside a
    quoted argument is a literal quote), an unmatched quote runs to the end of the line."""
    return [match[1].replace('""', '"') if match[1] is not None else match[2]
            for match in _ARGUMENT.finditer(arguments)]


# ---------------------------------------------------------------------------
# Pages: sections and their first paragraphs
# ---------------------------------------------------------------------------

SECTION_MACROS = {"SH", "Sh"}
# Requests and macros that end a paragraph (man and mdoc).
PARAGRAPH_BREAKS = {"PP", "LP", "P", "TP", "TQ", "IP", "HP", "sp", "SS", "Ss", "RS", "RE", "Pp", "Bl", "El", "It",
                    "Bd", "Ed", "nf", "fi", "EX", "EE", "TS", "TE"}
# Font macros: their arguments are text; alternating ones (BR, IR, ...) join them without spaces.
FONT_MACROS = {"B", "I", "R", "SM", "SB"}
ALTERNATING_FONT_MACROS = {"BI", "BR", "IB", "IR", "RB", "RI"}
BLOCK_REQUESTS = {"de", "de1", "am", "ig"}  # .de ... .. (a macro definition) and .ig ... .. are skipped


@dataclass(frozen=True)
class ManPage:
    """What the probe reads of one manual page.

    Args:
        name: the page's name(s) before the dash of its NAME line (``cat, tac``).
        summary: the NAME line's one-line description after the dash.
        sections: ``(heading, first paragraph)`` of every section in order, the NAME section first.
    """

    name: str
    summary: str
    sections: tuple[tuple[str, str], ...]

    def first_paragraph(self, heading: str) -> str:
        """The first paragraph of the section with this (English) heading, any case; ``""`` if the page has none."""
        return next((paragraph for title, paragraph in self.sections if title.upper() == heading.upper()), "")


_NAME_SEPARATOR = re.compile(r"\s+(?:-|--|—|–)\s+")
_CODING = re.compile(rb"-\*-.*?coding:\s*([\w.:-]+)", re.IGNORECASE)


def decode_roff(raw: bytes) -> str:
    """The page's text: in the encoding its first line declares (``.\\" -*- coding: latin-1 -*-``, man-db's
    convention), else UTF-8, else Latin-1 (which decodes every byte: old pages are mostly Latin-1)."""
    first_line = raw.split(b"\n", 1)[0]
    declared = _CODING.search(first_line)
    encodings = ([declared.group(1).decode("ascii")] if declared else []) + ["utf-8"]
    for encoding in encodings:
        try:
            return raw.decode(encoding)
        except (LookupError, UnicodeDecodeError):
            continue
    return raw.decode("latin-1")


def parse_man_page(source: str) -> ManPage | None:
    """Parses roff source (man or mdoc macros) into its NAME line and the first paragraph of every section.

    The NAME section is found by position (the first section), not by its heading, which translated pages
    translate (``BEZEICHNUNG``, ``NOM``, ``ИМЯ``). Returns None for a ``.so`` redirect (the page is an alias of
    another page) and for a page without a NAME line of the form ``name - summary``.

    Example:
        >>> page = parse_man_page('.TH LS 1\\n.SH NAME\\nls \\\\- list directory contents\\n.SH DESCRIPTION\\n'
        ...                       '.PP\\nList information about the \\\\fBFILE\\\\fPs.\\n.PP\\nMore.\\n')
        >>> page.name, page.summary, page.first_paragraph("DESCRIPTION")
        ('ls', 'list directory contents', 'List information about the FILEs.')
    """
    sections: list[tuple[str, list[list[str]]]] = []  # heading, paragraphs (each a list of text pieces)
    block_end = None  # the request that ends a skipped .de/.ig block: "." (the line "..") or a macro name
    heading_pending = False
    for line in source.splitlines():
        if block_end is not None:
            if line.startswith((".", "'")) and line[1:].split()[:1] == [block_end]:
                block_end = None
            continue
        if line.startswith((".", "'")):
            request, arguments = (line[1:].split(None, 1) + ["", ""])[:2]
            if request.startswith('\\"') or not request:  # comment or empty request
                continue
            if request == "so":
                return None
            words = macro_arguments(arguments.split('\\"', 1)[0])  # without a trailing comment
            if request in BLOCK_REQUESTS:
                # .de NAME [END] ... .. (or .END);  .ig [END] ... .. (or .END)
                end_position = 0 if request == "ig" else 1
                block_end = words[end_position] if len(words) > end_position else "."
                continue
            if request in SECTION_MACROS:
                heading = roff_text(" ".join(words))
                sections.append((heading, [[]]))
                heading_pending = not heading  # `.SH` alone: the heading is the next text line
                continue
            if sections:
                _add_macro_text(sections[-1][1], request, words)
            continue
        if not sections:
            continue
        if heading_pending:
            sections[-1] = (roff_text(" ".join(macro_arguments(line))), sections[-1][1])
            heading_pending = False
            continue
        paragraphs = sections[-1][1]
        if not line.strip():  # a blank line is a paragraph break in roff
            _break_paragraph(paragraphs)
        elif text := roff_text(line):
            paragraphs[-1].append(text)

    if not sections:
        return None
    firsts = tuple((heading, " ".join(next((p for p in paragraphs if p), []))) for heading, paragraphs in sections)
    name, summary = _split_name_line(" ".join(piece for paragraph in sections[0][1] for piece in paragraph))
    if not name or not summary:
        return None
    return ManPage(name=name, summary=summary, sections=firsts)


def _break_paragraph(paragraphs: list[list[str]]) -> None:
    if paragraphs[-1]:
        paragraphs.append([])


def _add_macro_text(paragraphs: list[list[str]], request: str, words: list[str]) -> None:
    """Adds what a macro line prints to the current paragraph, or ends the paragraph."""
    if request in PARAGRAPH_BREAKS:
        _break_paragraph(paragraphs)
        return
    if request in FONT_MACROS or request == "Nm":  # mdoc's .Nm: the page's name
        text = " ".join(words)
    elif request in ALTERNATING_FONT_MACROS:
        text = "".join(words)
    elif request == "Nd":  # mdoc: the NAME line's description
        text = "- " + " ".join(words)
    elif request == "Xr" and words:  # mdoc cross reference: .Xr ls 1 -> ls(1)
        text = f"{words[0]}({words[1]})" if len(words) > 1 else words[0]
    else:  # any other request (.if, .ie, .TH, .IX, .br, .ds, ...) prints nothing we keep
        return
    if text := roff_text(text):
        paragraphs[-1].append(text)


def _split_name_line(name_line: str) -> tuple[str, str]:
    """``'ls - list directory contents'`` → ``('ls', 'list directory contents')``; ``('', '')`` without a dash."""
    parts = _NAME_SEPARATOR.split(name_line, maxsplit=1)
    return (parts[0].strip(), parts[1].strip()) if len(parts) == 2 else ("", "")


def read_man_page(path: str | Path) -> ManPage | None:
    """Reads and parses one gzip'd (or plain) roff page; None for a redirect, an unparsable page or a bad file."""
    raw = Path(path).read_bytes()
    try:
        raw = gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw
    except (OSError, EOFError, zlib.error):
        return None
    return parse_man_page(decode_roff(raw))


# ---------------------------------------------------------------------------
# Building and loading the corpus
# ---------------------------------------------------------------------------

_SECTION_DIR = re.compile(r"man\w+")


@dataclass(frozen=True)
class TranslatedPage:
    """A translated NAME summary and the English page it translates.

    Args:
        language: the man folder's language (``de``, ``pt_BR``).
        section: the section folder, ``man1``.
        page: the file name without ``.gz``, ``ls.1``.
        summary: the translated NAME summary.
    """

    language: str
    section: str
    page: str
    summary: str


@dataclass(frozen=True)
class EnglishPage:
    """An English page as the probe's document: its NAME line and the first paragraph of its DESCRIPTION."""

    section: str
    page: str
    name: str
    summary: str
    description: str

    @property
    def text(self) -> str:
        """``'ls - list directory contents. List information about the FILEs ...'``"""
        head = f"{self.name} - {self.summary}"
        return f"{head.rstrip('.')}. {self.description}" if self.description else head


def _pages(folder: Path) -> Iterable[Path]:
    """The page files of one section folder, aliases (symbolic links) left out."""
    return (path for path in sorted(folder.iterdir()) if path.is_file() and not path.is_symlink())


def _page_name(path: Path) -> str:
    return path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name


def _fingerprint(man_dir: Path, folders: list[Path]) -> str:
    """sha256 of the pages' relative paths, sizes and modification times: changes when a package adds,
    removes or updates pages, so a stale build is noticed without reading the pages."""
    digest = hashlib.sha256()
    for folder in folders:
        for path in _pages(folder):
            stat = path.stat()
            digest.update(f"{path.relative_to(man_dir)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _language_folders(man_dir: Path, languages: Sequence[str] | None) -> list[Path]:
    available = sorted(entry.name for entry in man_dir.iterdir()
                       if entry.is_dir() and not _SECTION_DIR.fullmatch(entry.name) and not entry.is_symlink()
                       and any(_SECTION_DIR.fullmatch(child.name) for child in entry.iterdir()))
    if languages is None:
        return [man_dir / language for language in available]
    unknown = sorted(set(languages) - set(available))
    if unknown:
        raise ValueError(f"languages {unknown} have no translated pages under {man_dir}; present: "
                         f"{', '.join(available) or 'none'}")
    return [man_dir / language for language in sorted(set(languages))]


def build_manpage_corpus(out_dir: str | Path = CORPUS_DIR, man_dir: str | Path = MAN_DIR,
                         languages: Sequence[str] | None = None) -> dict:
    """Builds the corpus once and returns the manifest (dict).

    When ``out_dir/manifest.json`` records the same man_dir, languages and filter, and the pages on disk have
    not changed since (see ``source_fingerprint``), it is returned without rebuilding. Otherwise the corpus is
    written to a temporary sibling folder that replaces ``out_dir`` only once complete.

    Args:
        out_dir: where the corpus goes (an ignored folder, ``data/manpages``).
        man_dir: the man tree: ``man<N>/`` (English) and ``<lang>/man<N>/`` (translations).
        languages: the translations to read; None: every language folder present.
    """
    out_dir, man_dir = Path(out_dir), Path(man_dir).resolve()
    if not man_dir.is_dir():
        raise ValueError(f"man_dir {man_dir} is not a directory")
    language_folders = _language_folders(man_dir, languages)
    translated_folders = [section for folder in language_folders for section in sorted(folder.iterdir())
                          if _SECTION_DIR.fullmatch(section.name) and section.is_dir()]
    sections = sorted({folder.name for folder in translated_folders} & {
        entry.name for entry in man_dir.iterdir() if _SECTION_DIR.fullmatch(entry.name) and entry.is_dir()})
    parameters = {"languages": sorted(set(languages)) if languages is not None else None,
                  "filter": FILTER_DESCRIPTION}
    fingerprint = _fingerprint(man_dir, translated_folders + [man_dir / section for section in sections])

    existing = read_manifest(out_dir)
    if existing is not None and (existing.get("man_dir"), existing.get("parameters"),
                                 existing.get("source_fingerprint")) == (str(man_dir), parameters, fingerprint):
        return existing
    if existing is None and out_dir.exists() and any(out_dir.iterdir()):
        raise ValueError(f"{out_dir} is not empty and holds no {MANIFEST_NAME}; refusing to replace it")

    unreadable = {"redirect_or_unparsable": 0}
    english: dict[str, dict[str, EnglishPage]] = {}
    for section in sections:
        english[section] = {}
        for path in _pages(man_dir / section):
            page = read_man_page(path)
            if page is None:
                unreadable["redirect_or_unparsable"] += 1
                continue
            english[section][_page_name(path)] = EnglishPage(
                section, _page_name(path), page.name, page.summary, page.first_paragraph("DESCRIPTION"))

    translated: dict[str, list[TranslatedPage]] = {}
    language_counts = {}
    for folder in language_folders:
        counts = {"pages": 0, "pairs": 0, "no_english_page": 0, "untranslated": 0, "redirect_or_unparsable": 0}
        pairs = translated[folder.name] = []
        for section_folder in (folder / section for section in sections):
            if not section_folder.is_dir():
                continue
            for path in _pages(section_folder):
                counts["pages"] += 1
                original = english[section_folder.name].get(_page_name(path))
                page = read_man_page(path)
                if page is None:
                    counts["redirect_or_unparsable"] += 1
                elif original is None:
                    counts["no_english_page"] += 1
                elif is_near_copy(original.summary, page.summary):
                    counts["untranslated"] += 1
                else:
                    counts["pairs"] += 1
                    pairs.append(TranslatedPage(folder.name, section_folder.name, _page_name(path), page.summary))
        language_counts[folder.name] = counts

    staging_dir = out_dir.with_name(f".{out_dir.name}.building-{os.getpid()}")
    shutil.rmtree(staging_dir, ignore_errors=True)
    try:
        _write_jsonl(staging_dir / "english", {section: [vars(page) for page in pages.values()]
                                               for section, pages in english.items()})
        _write_jsonl(staging_dir / "translated", {language: [vars(page) for page in pages]
                                                  for language, pages in translated.items() if pages})
        manifest = {
            "format": MANIFEST_FORMAT,
            "source": "manpages",
            "man_dir": str(man_dir),
            "build_date": datetime.now(timezone.utc).isoformat(),
            "parameters": parameters,
            "source_fingerprint": fingerprint,
            "languages": language_counts,
            "english_pages": {section: len(pages) for section, pages in english.items()},
            "english_skipped": unreadable,
            "content_hash": content_hash(staging_dir),
        }
        (staging_dir / MANIFEST_NAME).write_text(json.dumps(manifest, ensure_ascii=False, indent=2) + "\n",
                                                 encoding="utf-8")
        _keep_or_replace(out_dir, staging_dir)
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    return manifest


def load_english(corpus_dir: str | Path, section: str) -> list[EnglishPage]:
    """The English pages of one section (``man1``) as built into ``corpus_dir``."""
    return [EnglishPage(**record) for record in _read_jsonl(Path(corpus_dir) / "english" / f"{section}.jsonl")]


def load_translated(corpus_dir: str | Path, language: str) -> list[TranslatedPage]:
    """The translated pages of one language, ``[]`` when the corpus has none."""
    return [TranslatedPage(**record)
            for record in _read_jsonl(Path(corpus_dir) / "translated" / f"{language}.jsonl")]


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def _stable_order(page: TranslatedPage | EnglishPage) -> str:
    return hashlib.sha1(f"{page.section}/{page.page}".encode()).hexdigest()


def retrieval_sample(corpus_dir: str | Path, languages: Sequence[str], max_queries: int,
                     documents_per_query: int = 4, leaked: Callable[[TranslatedPage], bool] | None = None
                     ) -> tuple[dict[str, list[TranslatedPage]], dict[str, list[EnglishPage]]]:
    """A deterministic retrieval sample: translated summaries (queries) and English pages (documents).

    Up to ``max_queries`` translated pages per language, one per page and per summary text, taken in the order
    of a hash of the page (the same for every language, so languages share English pages where they can). The
    documents of a section are the English pages of those queries plus other English pages of the same
    section (distractors, in hash order) up to ``documents_per_query`` times the section's distinct relevant
    pages, so the cost grows with the queries, not with the size of the section (man1 has thousands of pages).
    A section with a single English page (nothing to choose from) is left out. A page for which ``leaked`` is true
    (e.g. its summary is a training text) is never a query.

    Returns:
        ``({language: queries}, {section: documents})``; languages without pages are absent.
    """
    if documents_per_query < 1:
        raise ValueError(f"documents_per_query={documents_per_query} must be at least 1 (the relevant page)")
    queries: dict[str, list[TranslatedPage]] = {}
    for language in languages:
        chosen, summaries = [], set()
        for page in sorted(load_translated(corpus_dir, language), key=_stable_order):
            if page.summary not in summaries and not (leaked and leaked(page)):
                summaries.add(page.summary)
                chosen.append(page)
        if chosen:
            queries[language] = chosen[:max_queries]

    relevant: dict[str, set[str]] = {}
    for pages in queries.values():
        for page in pages:
            relevant.setdefault(page.section, set()).add(page.page)
    documents = {}
    for section, pages in sorted(relevant.items()):
        english = sorted(load_english(corpus_dir, section), key=_stable_order)
        if len(english) < 2:
            continue
        wanted = min(len(english), documents_per_query * len(pages))
        distractors = [page for page in english if page.page not in pages][: wanted - len(pages)]
        documents[section] = [page for page in english if page.page in pages] + distractors
    queries = {language: [page for page in pages if page.section in documents]
               for language, pages in queries.items()}
    return {language: pages for language, pages in queries.items() if pages}, documents


def _write_jsonl(folder: Path, records_by_file: dict[str, list[dict]]) -> None:
    folder.mkdir(parents=True)
    for stem, records in records_by_file.items():
        with (folder / f"{stem}.jsonl").open("w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _keep_or_replace(destination: Path, finished: Path) -> None:
    """Moves the finished build into place, unless another process (a second device of the same run) finished the
    same content from the same pages meanwhile: then that build stays."""
    ours, theirs = read_manifest(finished), read_manifest(destination)
    if theirs is None or theirs["content_hash"] != ours["content_hash"]:
        replace_directory(destination, finished)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the manual-page probe corpus and print its size.")
    parser.add_argument("--out", default=CORPUS_DIR, help=f"corpus folder (default {CORPUS_DIR})")
    parser.add_argument("--man-dir", default=MAN_DIR, help=f"man tree to read (default {MAN_DIR})")
    args = parser.parse_args(argv)
    manifest = build_manpage_corpus(args.out, args.man_dir)
    print(f"{'language':<9} {'pages':>6} {'pairs':>6} {'no English':>10} {'untranslated':>12} {'unparsable':>10}")
    for language, counts in manifest["languages"].items():
        print(f"{language:<9} {counts['pages']:>6} {counts['pairs']:>6} {counts['no_english_page']:>10} "
              f"{counts['untranslated']:>12} {counts['redirect_or_unparsable']:>10}")
    print("English pages per section:", ", ".join(f"{section} {count}"
                                                 for section, count in manifest["english_pages"].items()))
    print(f"{args.out}: content hash {manifest['content_hash']}")


if __name__ == "__main__":
    main()
