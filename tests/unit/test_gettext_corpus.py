"""Tests for datamodules.gettext_corpus on hand-written .mo catalogs."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from datamodules.gettext_corpus import (
    SPLITS,
    Pair,
    build_gettext_corpus,
    clean_pair,
    is_near_copy,
    load_split,
    read_mo,
    split_of,
)

UTF8_HEADER = "Content-Type: text/plain; charset=UTF-8\nPlural-Forms: nplurals=2; plural=(n != 1);\n"
LATIN1_HEADER = "Content-Type: text/plain; charset=ISO-8859-1\n"


def encode_mo(entries: dict[bytes, bytes], byte_order: str = "<") -> bytes:
    """Encodes raw msgid -> msgstr byte strings into a GNU .mo file (no hash table)."""
    msgids = sorted(entries)
    count = len(msgids)
    originals_offset = 28
    translations_offset = originals_offset + 8 * count
    strings_offset = translations_offset + 8 * count

    blob = b""
    original_table, translation_table = [], []
    for table, strings in ((original_table, msgids), (translation_table, [entries[m] for m in msgids])):
        for string in strings:
            table += [len(string), strings_offset + len(blob)]
            blob += string + b"\0"
    header = struct.pack(
        byte_order + "7I", 0x950412DE, 0, count, originals_offset, translations_offset, 0, 0
    )
    tables = struct.pack(f"{byte_order}{4 * count}I", *original_table, *translation_table)
    return header + tables + blob


def write_mo(path: Path, entries: dict[str, str], header: str = UTF8_HEADER,
             encoding: str = "utf-8", byte_order: str = "<") -> Path:
    """Writes a catalog from text entries; keys may hold "\\x04" (context) and "\\x00" (plurals)."""
    raw = {"".encode(encoding): header.encode(encoding)}
    raw.update({msgid.encode(encoding): msgstr.encode(encoding) for msgid, msgstr in entries.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_mo(raw, byte_order))
    return path


# ---------------------------------------------------------------------------
# read_mo
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_read_mo_utf8_with_context_and_plural(tmp_path, byte_order):
    path = write_mo(
        tmp_path / "app.mo",
        {
            "Open File": "Datei öffnen",
            "menu\x04Quit": "Beenden",
            "One file was deleted\x00%d files were deleted": "Eine Datei wurde gelöscht\x00%d Dateien",
        },
        byte_order=byte_order,
    )
    assert sorted(read_mo(path)) == [
        ("One file was deleted", "Eine Datei wurde gelöscht"),
        ("Open File", "Datei öffnen"),
        ("Quit", "Beenden"),
    ]


@pytest.mark.parametrize("byte_order", ["<", ">"])
def test_read_mo_decodes_header_charset(tmp_path, byte_order):
    path = write_mo(
        tmp_path / "latin.mo",
        {"Create a new document": "Créer un nouveau document"},
        header=LATIN1_HEADER,
        encoding="latin-1",
        byte_order=byte_order,
    )
    assert path.read_bytes().count(b"\xe9") == 1  # really Latin-1 on disk
    assert list(read_mo(path)) == [("Create a new document", "Créer un nouveau document")]


def test_read_mo_unknown_charset_falls_back_to_utf8(tmp_path):
    path = tmp_path / "odd.mo"
    path.write_bytes(
        encode_mo(
            {
                b"": b"Content-Type: text/plain; charset=CHARSET\n",
                b"Good": "Gut ä".encode(),
                b"Broken": b"Kaputt \xff",
            }
        )
    )
    assert sorted(read_mo(path)) == [("Broken", "Kaputt \ufffd"), ("Good", "Gut ä")]


def test_read_mo_without_header(tmp_path):
    path = tmp_path / "bare.mo"
    path.write_bytes(encode_mo({b"Hello": b"Hallo"}, ">"))
    assert list(read_mo(path)) == [("Hello", "Hallo")]


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"\x00" * 40,  # bad magic
        "truncated",
    ],
)
def test_read_mo_rejects_corrupt_files(tmp_path, content):
    if content == "truncated":
        content = encode_mo({b"": UTF8_HEADER.encode(), b"Hello world": b"Hallo Welt"})[:-12]
    path = tmp_path / "broken.mo"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="broken.mo"):
        list(read_mo(path))


# ---------------------------------------------------------------------------
# clean_pair, split_of, is_near_copy
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("en", "xx", "expected"),
    [
        ("  _Open the selected file now ", " Ausgewählte Datei jetzt _öffnen ",
         ("Open the selected file now", "Ausgewählte Datei jetzt öffnen")),
        ("&Save the current document", "Aktuelles Dokument &speichern",
         ("Save the current document", "Aktuelles Dokument speichern")),
        ("Copy & paste the selected text", "Ausgewählten Text kopieren & einfügen",
         ("Copy paste the selected text", "Ausgewählten Text kopieren einfügen")),
        ("Deleted %d files from the folder", "%d Dateien aus dem Ordner gelöscht", None),
        ("Deleted {count} files from the folder", "Dateien aus dem Ordner gelöscht", None),
        ("Click <b>here</b> to continue now", "Hier klicken um fortzufahren", None),
        ("Delete the files from the folder", "Dateien {n} aus dem Ordner", None),
        ("Delete all selected files", "Alle ausgewählten Dateien löschen",
         ("Delete all selected files", "Alle ausgewählten Dateien löschen")),
        ("Delete selected files quickly", "Ausgewählte Dateien schnell löschen",
         ("Delete selected files quickly", "Ausgewählte Dateien schnell löschen")),
        ("Delete selected filesssssss", "Ausgewählte Dateien löschen", None),  # 3 words
        ("Delete the selected files\nfrom the folder", "Ausgewählte Dateien löschen", None),
        ("Delete the selected files now", "Ausgewählte Dateien\njetzt löschen", None),
        ("The GNU Image Manipulation Program", "The GNU Image _Manipulation Program", None),
        ("Delete the selected files now", "   ", None),
        ("Do it now ok", "Mach es jetzt sofort bitte", None),  # 12 characters
    ],
)
def test_clean_pair(en, xx, expected):
    assert clean_pair(en, xx) == expected


def test_clean_pair_length_boundary():
    sentence_300 = ("word " * 60)[:299] + "x"
    assert len(sentence_300) == 300
    assert clean_pair(sentence_300, "Übersetzung") == (sentence_300, "Übersetzung")
    assert clean_pair(sentence_300 + "x", "Übersetzung") is None
    assert clean_pair("a b c " + "d" * 14, "Übersetzung") == ("a b c " + "d" * 14, "Übersetzung")  # 20
    assert clean_pair("a b c " + "d" * 13, "Übersetzung") is None  # 19


def test_split_of_is_deterministic_and_locale_independent():
    sentence = "Show hidden files in the file manager"
    assert {split_of(sentence) for _ in range(5)} == {split_of(sentence)}
    assert split_of(sentence) in SPLITS
    assert split_of(sentence, 0.0, 1.0) == "test"
    assert split_of(sentence, 1.0, 0.0) == "probe"
    assert split_of(sentence, 0.0, 0.0) == "train"
    with pytest.raises(ValueError):
        split_of(sentence, 0.6, 0.6)


@pytest.mark.parametrize(("probe_fraction", "test_fraction"), [(0.05, 0.05), (0.1, 0.2)])
def test_split_of_fractions(probe_fraction, test_fraction):
    total = 20_000
    splits = [split_of(f"Synthetic sentence number {i} for testing", probe_fraction, test_fraction)
              for i in range(total)]
    assert abs(splits.count("probe") / total - probe_fraction) < 0.01
    assert abs(splits.count("test") / total - test_fraction) < 0.01


def test_is_near_copy():
    assert is_near_copy("GNOME Disk Utility Settings", "GNOME Disk Utility Einstellungen", 0.5)
    assert not is_near_copy("GNOME Disk Utility Settings", "GNOME Disk Utility Einstellungen", 0.9)
    assert is_near_copy("Firefox Web Browser Launcher", "firefox web browser launcher!")
    assert not is_near_copy("Open the selected file now", "Ausgewählte Datei jetzt öffnen")


# ---------------------------------------------------------------------------
# build_gettext_corpus and load_split
# ---------------------------------------------------------------------------

PROBE_FRACTION = TEST_FRACTION = 0.3


def sentences_by_split(per_split: int) -> dict[str, list[str]]:
    """English sentences, `per_split` of each split under the test fractions."""
    chosen: dict[str, list[str]] = {split: [] for split in SPLITS}
    i = 0
    while min(map(len, chosen.values())) < per_split:
        sentence = f"Open the selected document number {i} now"
        bucket = chosen[split_of(sentence, PROBE_FRACTION, TEST_FRACTION)]
        if len(bucket) < per_split:
            bucket.append(sentence)
        i += 1
    return chosen


def translation(sentence: str, locale: str) -> str:
    number = sentence.split()[4]
    return f"{locale.upper()} übersetzter Satz Nummer {number} hier"


@pytest.fixture
def fake_catalogs(tmp_path):
    """catalog_dir with de, fr, pt_BR (plus an English locale to skip), a corrupt file."""
    chosen = sentences_by_split(3)
    root = tmp_path / "locale"
    expected: dict[str, dict[str, set[tuple[str, str]]]] = {}
    near_copies = {split: sentences[0] for split, sentences in chosen.items()}

    for locale in ("de", "fr", "pt_BR"):
        entries = {}
        for split, sentences in chosen.items():
            for sentence in sentences:
                if sentence == near_copies[split]:
                    entries[sentence] = sentence.upper() + "!"
                else:
                    entries[sentence] = translation(sentence, locale)
                    assert not is_near_copy(sentence, entries[sentence])
        entries["Deleted %d files from the folder"] = "%d Dateien gelöscht"  # filtered out
        entries["Short"] = "Kurz"  # filtered out
        messages = root / locale / "LC_MESSAGES"
        if locale == "fr":
            write_mo(messages / "app.mo", entries, header=LATIN1_HEADER, encoding="latin-1",
                     byte_order=">")
        else:
            write_mo(messages / "app.mo", entries)
        # Same pairs again in a second catalog: duplicates are kept once.
        write_mo(messages / "zz_duplicate.mo", entries)
        expected[locale] = {split: set() for split in SPLITS}
        for sentence, xx in entries.items():
            if sentence in near_copies.values() and sentence != near_copies["train"]:
                continue
            cleaned = clean_pair(sentence, xx)
            if cleaned:
                expected[locale][split_of(sentence, PROBE_FRACTION, TEST_FRACTION)].add(cleaned)

    write_mo(root / "en_GB" / "LC_MESSAGES" / "app.mo",
             {chosen["train"][1]: chosen["train"][1] + " (British)"})
    (root / "de" / "LC_MESSAGES" / "corrupt.mo").write_bytes(b"\xde\x12\x04\x95" + b"\x00" * 10)
    (root / "locale.alias").write_text("not a locale folder\n")
    return root, expected, near_copies


def build(out_dir, catalog_dir, **overrides):
    parameters = dict(probe_fraction=PROBE_FRACTION, test_fraction=TEST_FRACTION, progress=False)
    parameters.update(overrides)
    return build_gettext_corpus(out_dir, catalog_dir, **parameters)


def test_build_writes_expected_corpus(tmp_path, fake_catalogs):
    catalog_dir, expected, near_copies = fake_catalogs
    out_dir = tmp_path / "corpus"
    manifest = build(out_dir, catalog_dir)

    assert manifest == json.loads((out_dir / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["format"] == 1 and manifest["source"] == "gettext"
    assert manifest["catalogs_read"] == 6
    assert [Path(f["path"]).name for f in manifest["catalogs_failed"]] == ["corrupt.mo"]
    assert "corrupt.mo" in manifest["catalogs_failed"][0]["error"]
    assert sorted(manifest["locales"]) == ["de", "fr", "pt_BR"]
    assert manifest["parameters"]["locales"] is None
    assert len(manifest["content_hash"]) == 64

    english_by_split = {split: set() for split in SPLITS}
    for locale, splits in expected.items():
        for split in SPLITS:
            pairs = load_split(out_dir, split, locale)
            assert {(p.en, p.xx) for p in pairs} == splits[split]
            assert [(p.en, p.xx) for p in pairs] == sorted((p.en, p.xx) for p in pairs)
            assert all(p.locale == locale and p.catalog == "app" for p in pairs)
            assert manifest["locales"][locale][split] == len(pairs)
            english_by_split[split].update(p.en for p in pairs)
        assert manifest["locales"][locale]["near_copies_removed"] == 2
        train_pairs = {(p.en, p.xx) for p in load_split(out_dir, "train", locale)}
        assert (near_copies["train"], near_copies["train"].upper() + "!") in train_pairs

    assert manifest["distinct_english"] == {split: len(en) for split, en in english_by_split.items()}
    for first, second in [("train", "probe"), ("train", "test"), ("probe", "test")]:
        assert not english_by_split[first] & english_by_split[second]

    fr_pair = load_split(out_dir, "train", "fr")[0]
    assert fr_pair == Pair(en=fr_pair.en, xx=translation(fr_pair.en, "fr"), locale="fr", catalog="app")
    assert "ü" in fr_pair.xx  # decoded from Latin-1
    line = (out_dir / "train" / "fr.jsonl").read_text(encoding="utf-8").splitlines()[0]
    assert "ü" in line and set(json.loads(line)) == {"en", "xx", "catalog"}
    assert not list(tmp_path.glob(".corpus.*"))  # no staging folder left behind


def test_build_is_deterministic(tmp_path, fake_catalogs):
    catalog_dir, _, _ = fake_catalogs
    first = build(tmp_path / "a", catalog_dir)
    second = build(tmp_path / "b", catalog_dir)
    assert first["content_hash"] == second["content_hash"]
    assert first["build_date"] != second["build_date"]


def test_second_build_is_a_no_op_and_parameter_change_rebuilds(tmp_path, fake_catalogs):
    catalog_dir, _, _ = fake_catalogs
    out_dir = tmp_path / "corpus"
    first = build(out_dir, catalog_dir)
    train_file = out_dir / "train" / "de.jsonl"
    mtime = train_file.stat().st_mtime_ns

    started = time.perf_counter()
    again = build(out_dir, catalog_dir)
    assert time.perf_counter() - started < 0.1
    assert again == first
    assert train_file.stat().st_mtime_ns == mtime

    changed = build(out_dir, catalog_dir, near_copy_threshold=0.99)
    assert changed["build_date"] != first["build_date"]
    assert changed["parameters"]["near_copy_threshold"] == 0.99
    assert json.loads((out_dir / "manifest.json").read_text())["build_date"] == changed["build_date"]
    assert not list(tmp_path.glob(".corpus.*"))


def test_build_selected_locales(tmp_path, fake_catalogs):
    catalog_dir, expected, _ = fake_catalogs
    out_dir = tmp_path / "corpus"
    manifest = build(out_dir, catalog_dir, locales=["pt_BR"])
    assert sorted(manifest["locales"]) == ["pt_BR"]
    assert manifest["parameters"]["locales"] == ["pt_BR"]
    assert manifest["catalogs_read"] == 2 and manifest["catalogs_failed"] == []
    assert {(p.en, p.xx) for p in load_split(out_dir, "train", "pt_BR")} == expected["pt_BR"]["train"]
    with pytest.raises(FileNotFoundError, match=r"de\.jsonl.*pt_BR"):
        load_split(out_dir, "train", "de")


def test_build_unknown_locale_lists_close_matches(tmp_path, fake_catalogs):
    catalog_dir, _, _ = fake_catalogs
    with pytest.raises(ValueError, match=r"'pt_PT'.*'pt_BR'.*") as error:
        build(tmp_path / "corpus", catalog_dir, locales=["de", "pt_PT"])
    assert "3 non-English locales available" in str(error.value)
    assert not (tmp_path / "corpus").exists()


def test_build_refuses_to_replace_foreign_folder(tmp_path, fake_catalogs):
    catalog_dir, _, _ = fake_catalogs
    out_dir = tmp_path / "precious"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="refusing"):
        build(out_dir, catalog_dir)
    assert (out_dir / "notes.txt").read_text() == "keep me"


def test_load_split_rejects_unknown_split(tmp_path):
    with pytest.raises(ValueError, match="unknown split"):
        load_split(tmp_path, "validation", "de")


# ---------------------------------------------------------------------------
# A real catalog, when the machine has one
# ---------------------------------------------------------------------------

REAL_GERMAN = Path("/usr/share/locale/de/LC_MESSAGES")


@pytest.mark.skipif(not REAL_GERMAN.is_dir(), reason="no German gettext catalogs installed")
def test_real_german_catalogs(tmp_path):
    catalogs = sorted(REAL_GERMAN.glob("*.mo"))
    if not catalogs:
        pytest.skip("no German gettext catalogs installed")
    cleaned = [
        pair
        for catalog in catalogs
        for pair in map(lambda entry: clean_pair(*entry), read_mo(catalog))
        if pair is not None
    ]
    assert cleaned
    for en, xx in cleaned:
        assert en == en.strip() and xx and en != xx
        assert "\n" not in en + xx and not set("%{<_&") & set(en + xx)
        assert 20 <= len(en) <= 300 and len(en.split()) >= 4
