"""Tests for datamodules.manpages_corpus on hand-written roff pages and a fake man tree in a tmp folder."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from datamodules.manpages_corpus import (
    EnglishPage,
    build_manpage_corpus,
    decode_roff,
    load_english,
    load_translated,
    macro_arguments,
    parse_man_page,
    read_man_page,
    retrieval_sample,
    roff_text,
)

# ---------------------------------------------------------------------------
# The roff parser
# ---------------------------------------------------------------------------


def test_roff_text_replaces_and_removes_escapes():
    assert roff_text(r"\fBls\fP \- list \fIdirectory\fR contents") == "ls - list directory contents"
    assert roff_text(r"a \(em b \[en] c \(lqq\(rq \*(lqs\*(rq") == "a — b – c “q” “s”"
    assert roff_text(r"f\(:ur \[u00E9]t\('e \(,c") == "für été ç"
    assert roff_text(r"\f(CWcode\f[] \s-1SMALL\s0 back\eslash \&.dot a\|b\^c\%d\:e") == \
        r"code SMALL back\slash .dot abcde"
    assert roff_text(r"x\ y\~z \*(Aqq\*(Aq \[unknown]w \*[undefined]v") == "x y z 'q' w v"
    assert roff_text(r"text \" a comment") == "text"
    assert roff_text(r"\h'3n'wide\w'abc' \n(.gno register \n[an-margin]x") == "wide no register x"


def test_macro_arguments_split_like_roff():
    assert macro_arguments(r'NAME') == ["NAME"]
    assert macro_arguments(r'"SEE ALSO" second  third') == ["SEE ALSO", "second", "third"]
    assert macro_arguments(r'"a ""quoted"" word" "unterminated rest') == ['a "quoted" word', "unterminated rest"]


GERMAN_PAGE = r""".\" -*- coding: UTF-8 -*-
'\" t
.TH LS 1 "2022" "GNU coreutils 9.1" "Dienstprogramme für Benutzer"
.de  URL
\fI\\$2\fP <\\$1>\\$3
..
.if  \n[.g] \{\
.  am MTO
.    ad l
.  .
.\}
.SH BEZEICHNUNG
ls \- Verzeichnisinhalte auflisten
.SH ÜBERSICHT
.B ls
[\fI\,OPTION\/\fR]...
.SH BESCHREIBUNG
.\" Add any additional description here
.PP
Informationen über die
.BR DATEI en \" inline comment
auflisten.

Zweiter Absatz.
.SH
"SIEHE AUCH"
\fBdircolors\fP(1)
"""


def test_name_section_is_found_by_position_and_first_paragraphs_per_section():
    page = parse_man_page(GERMAN_PAGE)
    assert (page.name, page.summary) == ("ls", "Verzeichnisinhalte auflisten")
    # .de/.am blocks (also ended by an indented ". .") print nothing; .SH alone takes the next line as heading.
    assert page.sections == (
        ("BEZEICHNUNG", "ls - Verzeichnisinhalte auflisten"),
        ("ÜBERSICHT", "ls [OPTION]..."),
        ("BESCHREIBUNG", "Informationen über die DATEIen auflisten."),
        ("SIEHE AUCH", "dircolors(1)"),
    )
    assert page.first_paragraph("DESCRIPTION") == ""  # English headings only


def test_paragraphs_end_at_paragraph_macros_and_name_lines_may_span_lines():
    page = parse_man_page(".TH X 8\n.SH NAME\nmount, umount\n\\- mount a\n.I filesystem\n.SH DESCRIPTION\n"
                          ".TP\n\\fB\\-a\\fR\nall\n.PP\nnext\n")
    assert (page.name, page.summary) == ("mount, umount", "mount a filesystem")
    assert page.first_paragraph("description") == "-a all"  # .TP starts a paragraph; .PP ends it


def test_mdoc_pages_read_nm_and_nd():
    page = parse_man_page(".Dd May 1, 2020\n.Dt SSH 1\n.Sh NAME\n.Nm ssh\n.Nd OpenSSH remote login client\n"
                          ".Sh DESCRIPTION\nConnects, see\n.Xr sshd 8 .\n.Pp\nMore.\n")
    assert (page.name, page.summary) == ("ssh", "OpenSSH remote login client")
    assert page.first_paragraph("DESCRIPTION") == "Connects, see sshd(8)"


@pytest.mark.parametrize("source", [
    ".so man1/other.1\n",                                             # a redirect: an alias of another page
    ".TH X 1\n.SH NAME\nx without a separator\n.SH DESCRIPTION\nText.\n",
    ".TH X 1\n.SH NAME\nx \\-\n.SH DESCRIPTION\nText.\n",               # empty summary
    ".TH X 1\nno sections at all\n",
])
def test_redirects_and_pages_without_a_name_line_are_skipped(source):
    assert parse_man_page(source) is None


def test_decoding_follows_the_declared_coding_then_utf8_then_latin1():
    assert decode_roff("Größe".encode()) == "Größe"
    assert decode_roff("Größe".encode("latin-1")) == "Größe"  # not UTF-8, no declaration
    koi8 = '.\\" -*- coding: koi8-r -*-\nИМЯ\n'
    assert decode_roff(koi8.encode("koi8-r")) == koi8
    assert decode_roff(b'.\\" -*- coding: no-such-codec -*-\n\xe9') == '.\\" -*- coding: no-such-codec -*-\né'


def test_read_man_page_reads_gzip_and_plain_files_and_rejects_corrupt_ones(tmp_path):
    source = ".TH X 1\n.SH NOM\nx \\- r\\('esum\\('e\n"
    (tmp_path / "x.1.gz").write_bytes(gzip.compress(source.encode("latin-1")))
    (tmp_path / "x.1").write_text(source)
    (tmp_path / "bad.1.gz").write_bytes(b"\x1f\x8bnot gzip at all")
    assert read_man_page(tmp_path / "x.1.gz").summary == "résumé"
    assert read_man_page(tmp_path / "x.1").summary == "résumé"
    assert read_man_page(tmp_path / "bad.1.gz") is None


# ---------------------------------------------------------------------------
# The corpus builder on a fake man tree
# ---------------------------------------------------------------------------


def page_source(name: str, summary: str, description: str = "") -> str:
    return f".TH {name.upper()} 1\n.SH NAME\n{name} \\- {summary}\n.SH DESCRIPTION\n.PP\n{description}\n"


def write_page(man_dir: Path, relative: str, source: str, encoding: str = "utf-8") -> Path:
    path = man_dir / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(source.encode(encoding)))
    return path


@pytest.fixture
def man_dir(tmp_path) -> Path:
    """English man1 (ls, cat, sort, tr) and man8 (mount); German and French translations of some."""
    man = tmp_path / "man"
    write_page(man, "man1/ls.1.gz", page_source("ls", "list directory contents", "List information about FILEs."))
    write_page(man, "man1/cat.1.gz", page_source("cat", "concatenate files and print on the standard output"))
    write_page(man, "man1/sort.1.gz", page_source("sort", "sort lines of text files", "Write sorted lines."))
    write_page(man, "man1/tr.1.gz", page_source("tr", "translate or delete characters"))
    write_page(man, "man1/redirect.1.gz", ".so man1/ls.1\n")
    write_page(man, "man8/mount.8.gz", page_source("mount", "mount a filesystem"))
    write_page(man, "de/man1/ls.1.gz", page_source("ls", "Verzeichnisinhalte auflisten"))
    write_page(man, "de/man1/sort.1.gz", page_source("sort", "Zeilen von Textdateien sortieren"))
    write_page(man, "de/man1/cat.1.gz", page_source("cat", "concatenate files and print on the standard output"))
    write_page(man, "de/man1/gone.1.gz", page_source("gone", "ohne englische Seite"))  # no English page
    write_page(man, "de/man1/alias.1.gz", ".so man1/ls.1\n")
    os.symlink("ls.1.gz", man / "de/man1/dir.1.gz")  # an alias: not a page of its own
    write_page(man, "fr/man8/mount.8.gz", page_source("mount", "monter un système de fichiers"), "latin-1")
    return man


def test_builder_pairs_translations_with_english_pages_and_counts_per_language(man_dir, tmp_path):
    out = tmp_path / "corpus"
    manifest = build_manpage_corpus(out, man_dir)
    assert manifest["languages"] == {
        "de": {"pages": 5, "pairs": 2, "no_english_page": 1, "untranslated": 1, "redirect_or_unparsable": 1},
        "fr": {"pages": 1, "pairs": 1, "no_english_page": 0, "untranslated": 0, "redirect_or_unparsable": 0},
    }
    assert manifest["english_pages"] == {"man1": 4, "man8": 1}
    assert manifest["english_skipped"] == {"redirect_or_unparsable": 1}
    assert [(p.section, p.page, p.summary) for p in load_translated(out, "de")] == [
        ("man1", "ls.1", "Verzeichnisinhalte auflisten"), ("man1", "sort.1", "Zeilen von Textdateien sortieren")]
    assert load_translated(out, "fr")[0].summary == "monter un système de fichiers"  # Latin-1 source
    assert load_translated(out, "it") == []
    ls = next(page for page in load_english(out, "man1") if page.page == "ls.1")
    assert ls.text == "ls - list directory contents. List information about FILEs."
    assert EnglishPage("man1", "tr.1", "tr", "translate or delete characters.", "").text == \
        "tr - translate or delete characters."
    assert json.loads((out / "manifest.json").read_text())["content_hash"] == manifest["content_hash"]


def test_builder_reuses_a_build_of_the_same_pages_and_rebuilds_when_pages_change(man_dir, tmp_path):
    out = tmp_path / "corpus"
    first = build_manpage_corpus(out, man_dir)
    assert build_manpage_corpus(out, man_dir)["build_date"] == first["build_date"]  # not rebuilt
    write_page(man_dir, "de/man1/tr.1.gz", page_source("tr", "Zeichen umwandeln oder löschen"))  # a package adds one
    second = build_manpage_corpus(out, man_dir)
    assert second["languages"]["de"]["pairs"] == 3 and second["content_hash"] != first["content_hash"]
    assert second["source_fingerprint"] != first["source_fingerprint"]


def test_builder_refuses_foreign_folders_and_unknown_languages(man_dir, tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty and holds no manifest.json"):
        build_manpage_corpus(foreign, man_dir)
    with pytest.raises(ValueError, match=r"languages \['it'\] have no translated pages .*present: de, fr"):
        build_manpage_corpus(tmp_path / "corpus", man_dir, languages=["de", "it"])
    with pytest.raises(ValueError, match="is not a directory"):
        build_manpage_corpus(tmp_path / "corpus", tmp_path / "missing")


# ---------------------------------------------------------------------------
# The retrieval sample
# ---------------------------------------------------------------------------


def test_retrieval_sample_keeps_relevant_pages_and_adds_distractors_of_the_same_section(man_dir, tmp_path):
    write_page(man_dir, "de/man8/mount.8.gz", page_source("mount", "ein Dateisystem einhängen"))
    write_page(man_dir, "fr/man1/ls.1.gz", page_source("ls", "lister le contenu des répertoires"))
    write_page(man_dir, "de/man1/tr.1.gz", page_source("tr", "Zeilen von Textdateien sortieren"))  # as sort's
    out = tmp_path / "corpus"
    build_manpage_corpus(out, man_dir)
    queries, documents = retrieval_sample(out, ["de", "fr", "it"], max_queries=10, documents_per_query=2)
    # man8 has a single English page: nothing to retrieve among, so the section and its queries are left out.
    assert sorted(documents) == ["man1"]
    # One query per summary text: sort and tr share theirs (which one stays depends on the hash order).
    assert sorted(queries) == ["de", "fr"] and [page.page for page in queries["fr"]] == ["ls.1"]
    assert sorted(page.summary for page in queries["de"]) == ["Verzeichnisinhalte auflisten",
                                                               "Zeilen von Textdateien sortieren"]
    relevant = {page.page for pages in queries.values() for page in pages}
    # Two relevant pages (ls and sort or tr) and 2 × 2 - 2 = 2 distractors: all four English man1 pages.
    assert sorted(page.page for page in documents["man1"]) == ["cat.1", "ls.1", "sort.1", "tr.1"]
    assert {page.page for page in documents["man1"][:2]} == relevant  # the relevant pages first
    one_each, few = retrieval_sample(out, ["de"], max_queries=1, documents_per_query=2)
    assert len(one_each["de"]) == 1 and len(few["man1"]) == 2
    assert one_each["de"][0].page == few["man1"][0].page
    assert retrieval_sample(out, ["de"], max_queries=1, documents_per_query=2) == (one_each, few)  # deterministic
    with pytest.raises(ValueError, match="documents_per_query=0 must be at least 1"):
        retrieval_sample(out, ["de"], max_queries=1, documents_per_query=0)
