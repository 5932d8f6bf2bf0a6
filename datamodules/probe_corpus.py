"""The probe's held-out data, as the probe reads it: the gettext corpus's probe pairs and a sample of Debian's
translated manual pages. Callbacks read corpora only through this module; the file layouts stay the builders'
(:mod:`datamodules.gettext_corpus`, :mod:`datamodules.manpages_corpus`)."""

from __future__ import annotations

import hashlib
import logging
import unicodedata
from pathlib import Path

from datamodules import manpages_corpus
from datamodules.gettext_corpus import MANIFEST_NAME, Pair, build_gettext_corpus, load_split, read_manifest
from datamodules.manpages_corpus import EnglishPage, TranslatedPage

__all__ = ["SPLIT", "EnglishPage", "Pair", "TranslatedPage", "build_corpus", "corpus_built", "corpus_revision",
           "english_pool", "manpage_sample", "normalised", "probe_sample", "training_texts"]

log = logging.getLogger(__name__)

SPLIT = "probe"
"""The held-out split of the gettext corpus that the probe reads (training never does)."""


def corpus_built(corpus_dir: str | Path) -> bool:
    """Whether ``corpus_dir`` holds a finished gettext corpus (a build writes its manifest last)."""
    return (Path(corpus_dir) / MANIFEST_NAME).is_file()


def build_corpus(corpus_dir: str | Path, catalog_dir: str | Path) -> dict:
    """Builds the gettext corpus (with its probe split) from the catalogs of ``catalog_dir``; returns its manifest."""
    return build_gettext_corpus(corpus_dir, catalog_dir)


def corpus_revision(corpus_dir: str | Path) -> str:
    """The corpus's content hash (the task's dataset revision), ``unknown`` without a manifest."""
    manifest = read_manifest(Path(corpus_dir))
    return manifest["content_hash"] if manifest else "unknown"


def normalised(text: str) -> str:
    """``text`` as leakage checks compare it: case-folded, punctuation removed, whitespace collapsed
    (``"Save the file…"`` and ``"save the file"`` are the same text)."""
    kept = "".join(" " if unicodedata.category(char).startswith("P") else char for char in text.casefold())
    return " ".join(kept.split())


def training_texts(corpus_dir: str | Path, locales: list[str]) -> set[str]:
    """The :func:`normalised` English and translated texts of the training split of ``locales`` (a locale without
    one is skipped): what a probe text must not equal."""
    texts: set[str] = set()
    for locale in locales:
        try:
            pairs = load_split(corpus_dir, "train", locale)
        except FileNotFoundError:
            continue
        texts.update(normalised(text) for pair in pairs for text in (pair.en, pair.xx))
    return texts


def _held_out(corpus_dir: str | Path, locale: str) -> list[Pair]:
    try:
        return load_split(corpus_dir, SPLIT, locale)
    except FileNotFoundError:
        return []


def probe_sample(corpus_dir: str | Path, locales: list[str], max_pairs: int, exclude: set[str] = frozenset()
                 ) -> tuple[dict[str, list[Pair]], dict[str, int]]:
    """``(pairs, dropped)``: up to ``max_pairs`` held-out pairs per locale, one per English sentence and per
    translation, leaving out (and counting in ``dropped``, per locale) the pairs whose :func:`normalised` English or
    translation is in ``exclude`` (e.g. :func:`training_texts`).

    Pairs are taken in the order of a hash of the English sentence, the same order for every locale, so the
    locales share English sentences where they can (fewer texts to encode). A locale without probe pairs is
    skipped with one log line.
    """
    def english_order(pair: Pair) -> str:
        return hashlib.sha1(pair.en.encode()).hexdigest()

    selected, dropped = {}, {}
    for locale in locales:
        chosen, seen, leaked = [], set(), 0
        for pair in sorted(_held_out(corpus_dir, locale), key=english_order):
            if exclude and (normalised(pair.en) in exclude or normalised(pair.xx) in exclude):
                leaked += 1
            elif pair.en not in seen and pair.xx not in seen:
                seen.update((pair.en, pair.xx))
                chosen.append(pair)
        if len(chosen) < 2:
            log.warning("probe: skipping locale %s: %d usable pairs in the %s split of %s", locale, len(chosen),
                        SPLIT, corpus_dir)
            continue
        selected[locale], dropped[locale] = chosen[:max_pairs], leaked
    if not selected:
        available = sorted(path.stem for path in (Path(corpus_dir) / SPLIT).glob("*.jsonl"))
        raise ValueError(f"probe.locales {locales}: none has probe pairs in {corpus_dir}; locales with probe pairs: "
                         f"{', '.join(available) or 'none (build the corpus first)'}")
    return selected, dropped


def english_pool(corpus_dir: str | Path, locales: list[str], exclude: set[str] = frozenset()) -> list[str]:
    """Every held-out English sentence of ``locales`` whose :func:`normalised` text is not in ``exclude``, sorted:
    the final evaluation's retrieval pool (thousands of candidates, not the sampled pairs' ~100)."""
    return sorted({pair.en for locale in locales for pair in _held_out(corpus_dir, locale)
                   if not exclude or normalised(pair.en) not in exclude})


def manpage_sample(locales: list[str] | None, max_queries: int, corpus_dir: str | Path | None = None,
                   man_dir: str | Path | None = None, exclude: set[str] = frozenset()
                   ) -> tuple[dict[str, list[TranslatedPage]], dict[str, list[EnglishPage]], dict, int]:
    """``(queries, documents, manifest, dropped)`` of the manual-page corpus ``corpus_dir`` (default
    ``manpages_corpus.CORPUS_DIR``), built from the man tree ``man_dir`` (default ``manpages_corpus.MAN_DIR``) if
    needed: up to ``max_queries`` translated pages per locale (None: every language with translated pages) and the
    English pages of their sections (see :func:`datamodules.manpages_corpus.retrieval_sample`). A page whose
    :func:`normalised` summary is in ``exclude`` (e.g. :func:`training_texts`) is not a query; ``dropped`` counts
    those pages.

    Raises:
        ValueError: naming both folders when the corpus cannot be built or read.
    """
    corpus_dir = corpus_dir or manpages_corpus.CORPUS_DIR
    man_dir = man_dir or manpages_corpus.MAN_DIR
    leaked: set[tuple[str, str, str]] = set()

    def is_leaked(page: TranslatedPage) -> bool:
        if normalised(page.summary) in exclude:
            leaked.add((page.language, page.section, page.page))
            return True
        return False

    try:
        manifest = manpages_corpus.build_manpage_corpus(corpus_dir, man_dir)
        if locales is None:
            locales = [language for language, counts in manifest["languages"].items() if counts["pairs"]]
        queries, documents = manpages_corpus.retrieval_sample(corpus_dir, locales, max_queries,
                                                              leaked=is_leaked if exclude else None)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot build the manual-page corpus {corpus_dir} from {man_dir} ({error})") from None
    return queries, documents, manifest, len(leaked)
