"""The probe's mteb tasks: two offline tasks on the corpus's held-out probe split, an out-of-domain one on Debian's
manual pages, plus any registry task by name.

Imported lazily, inside the probe's RNG guard: importing mteb and creating a task reseed Python's, NumPy's and
torch's global generators.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mteb
import numpy as np
from datasets import Dataset
from mteb.abstasks.abstask import AbsTask
from mteb.abstasks.retrieval import AbsTaskRetrieval
from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData
from mteb.abstasks.task_metadata import TaskMetadata
from mteb.abstasks.text.bitext_mining import AbsTaskBitextMining
from mteb.languages.check_language_code import check_language_code
from mteb.languages.iso_mappings import _hf_lang_to_iso_lang_script
from mteb.types import PromptType

from datamodules.probe_corpus import (SPLIT, EnglishPage, Pair, TranslatedPage, corpus_revision, english_pool,
                                      manpage_sample, probe_sample, training_texts)

log = logging.getLogger(__name__)

SCRIPT_VARIANTS = {"latin": "Latn", "cyrillic": "Cyrl", "TW": "Hant", "HK": "Hant"}


def mteb_language(locale: str) -> str:
    """mteb's ``iso639_3-Script`` code of a gettext locale: ``kk`` → ``kaz-Cyrl``, ``sr@latin`` → ``srp-Latn``,
    ``zh_TW`` → ``zho-Hant``; ``und`` (undetermined) when mteb does not know the language."""
    base, _, variant = locale.replace("@", "_").partition("_")
    code = _hf_lang_to_iso_lang_script(base)
    if code is None:
        return "und"
    if variant in SCRIPT_VARIANTS:
        code = f"{code.split('-')[0]}-{SCRIPT_VARIANTS[variant]}"
    try:
        check_language_code(code)
    except ValueError:
        return "und"
    return code


def _metadata(name: str, task_type: str, main_score: str, description: str, eval_langs, revision: str,
              dataset_path: str = "local/gettext-probe", domains: tuple[str, ...] = ("Web",)) -> TaskMetadata:
    return TaskMetadata(
        name=name, type=task_type, main_score=main_score, description=description,
        dataset={"path": dataset_path, "revision": revision}, reference=None, category="t2t",
        modalities=["text"], eval_splits=[SPLIT], eval_langs=eval_langs, date=None, domains=list(domains),
        task_subtypes=None, license="not specified", annotations_creators="human-annotated", dialect=[],
        sample_creation="found", bibtex_citation="")


class GettextBitextMining(AbsTaskBitextMining):
    """xx→en bitext mining on held-out gettext translations: one subset per locale (``kk-en``), each
    translation must find its English source among that locale's English sentences. Main score: accuracy
    (acc@1). Translations are read as queries and English sentences as passages, as in training (mteb's bitext
    evaluator passes no prompt type: :meth:`probe_inputs` declares the roles).

    Args:
        pairs: ``{locale: pairs}`` (see :func:`~datamodules.probe_corpus.probe_sample`).
        revision: the corpus's content hash.
    """

    def __init__(self, pairs: dict[str, list[Pair]], revision: str = "unknown") -> None:
        self.metadata = _metadata(
            "GettextBitextMining", "BitextMining", "accuracy",
            "Translations (xx) mined against English sources, per locale, from the held-out probe split of "
            "the gettext catalogs.",
            {f"{locale}-en": [mteb_language(locale), "eng-Latn"] for locale in pairs}, revision)
        self.pairs = pairs
        super().__init__()
        self.load_data()  # in memory: loaded tasks are never unloaded by mteb (which drops instance metadata)

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        self.dataset = {
            f"{locale}-en": {SPLIT: Dataset.from_dict({"sentence1": [p.xx for p in pairs],
                                                       "sentence2": [p.en for p in pairs]})}
            for locale, pairs in self.pairs.items()}
        self.data_loaded = True

    def probe_inputs(self) -> list[tuple[PromptType, str]]:
        """Every text the task will encode, with its role (encoded ahead, in one pass)."""
        return [(role, text) for pairs in self.pairs.values() for p in pairs
                for role, text in ((PromptType.query, p.xx), (PromptType.document, p.en))]

    def _compute_metrics(self, nearest_neighbors: list[dict[str, float]], gold: list[tuple[int, int]]) -> dict:
        """mteb's metrics, vectorised: sklearn's weighted precision, recall and F1 (zero_division=0) and accuracy.
        sklearn's input validation cost ~30 ms per subset and cell, most of a probe's scoring time."""
        predictions = np.array([neighbour["corpus_id"] for neighbour in nearest_neighbors])
        labels = np.array([gold[i][1] for i in range(len(predictions))])
        classes, index = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
        true_index, predicted_index = index[: len(labels)], index[len(labels):]
        true = np.bincount(true_index, minlength=len(classes))
        predicted = np.bincount(predicted_index, minlength=len(classes))
        hits = np.bincount(true_index[labels == predictions], minlength=len(classes))

        def weighted(numerator: np.ndarray, denominator: np.ndarray) -> float:
            ratio = np.divide(numerator, denominator, out=np.zeros(len(classes)), where=denominator > 0)
            return float(np.average(ratio, weights=true))

        return {"precision": weighted(hits, predicted), "recall": weighted(hits, true),
                "f1": weighted(2.0 * hits, true + predicted), "accuracy": float(np.mean(labels == predictions))}


class GettextRetrieval(AbsTaskRetrieval):
    """Cross-lingual retrieval: each held-out translation (from every probe locale, one pooled query set)
    retrieves its English source from the pool of all held-out English sources. Main score: nDCG@10.

    Args:
        pairs: ``{locale: pairs}`` (see :func:`~datamodules.probe_corpus.probe_sample`).
        revision: the corpus's content hash.
        pool: more English documents to search besides the pairs' sources (the final evaluation: every held-out
            English sentence of the locales, :func:`~datamodules.probe_corpus.english_pool`).
    """

    k_values = (1, 10)  # each cut-off adds ~10 scores (and their nAUCs) to compute per cell

    def __init__(self, pairs: dict[str, list[Pair]], revision: str = "unknown", pool: list[str] = ()) -> None:
        languages = sorted({mteb_language(locale) for locale in pairs} | {"eng-Latn"})
        self.metadata = _metadata(
            "GettextRetrieval", "Retrieval", "ndcg_at_10",
            "Translations from every probe locale (pooled queries) retrieve their English source among all "
            "held-out English sources of the gettext probe split.", languages, revision)
        self.pairs = pairs
        self.english = sorted({p.en for pairs in pairs.values() for p in pairs} | set(pool))
        super().__init__()
        self.load_data()

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        document = {text: f"en-{i}" for i, text in enumerate(self.english)}
        queries = [(f"{locale}-{i}", p) for locale, pairs in self.pairs.items() for i, p in enumerate(pairs)]
        self.dataset = {"default": {SPLIT: RetrievalSplitData(
            queries=Dataset.from_dict({"id": [qid for qid, _ in queries], "text": [p.xx for _, p in queries]}),
            corpus=Dataset.from_dict({"id": list(document.values()), "text": self.english,
                                      "title": [""] * len(self.english)}),
            relevant_docs={qid: {document[p.en]: 1} for qid, p in queries},
            top_ranked=None)}}
        self.data_loaded = True

    def probe_inputs(self) -> list[tuple[PromptType, str]]:
        return ([(PromptType.query, p.xx) for pairs in self.pairs.values() for p in pairs]
                + [(PromptType.document, text) for text in self.english])


class ManpageRetrieval(AbsTaskRetrieval):
    """Out-of-domain cross-lingual retrieval on Debian's manual pages: a page's translated NAME summary
    (``Zeilen von Textdateien sortieren``) retrieves its English page (``sort - sort lines of text files. Write
    sorted concatenation of all FILE(s) to standard output.``: the NAME line and the first DESCRIPTION paragraph)
    among the English pages of the same section: each query's candidates (mteb's ``top_ranked``) are the sampled
    pages of its section (``man1``, ``man8``, ...). Queries of all probe locales are pooled, so every query counts
    once, whatever the size of its section. Main score: nDCG@10. The corpus is built from ``/usr/share/man`` on
    first use (:func:`datamodules.manpages_corpus.build_manpage_corpus`; ``make manpages`` installs the
    translations).

    Args:
        queries: ``{language: translated pages}``; documents: ``{section: English pages}`` (see
            :func:`datamodules.manpages_corpus.retrieval_sample`).
        revision: the corpus's content hash.
    """

    k_values = (1, 10)

    def __init__(self, queries: dict[str, list[TranslatedPage]],
                 documents: dict[str, list[EnglishPage]], revision: str = "unknown") -> None:
        languages = sorted({mteb_language(language) for language in queries} | {"eng-Latn"})
        self.metadata = _metadata(
            "ManpageRetrieval", "Retrieval", "ndcg_at_10",
            "Translated NAME summaries of Debian manual pages retrieve their English page (NAME line and first "
            "DESCRIPTION paragraph) among English pages of the same section.", languages, revision,
            dataset_path="local/manpages-probe", domains=("Programming",))
        self.queries, self.documents = queries, documents
        super().__init__()
        self.load_data()

    @classmethod
    def from_corpus(cls, locales: list[str] | None, max_queries: int, corpus_dir: str | Path | None = None,
                    man_dir: str | Path | None = None, exclude: set[str] = frozenset()) -> ManpageRetrieval | None:
        """The task on up to ``max_queries`` pages per locale (None: every language with translated pages), building
        the corpus from the man tree if needed (:func:`datamodules.probe_corpus.manpage_sample`, which has the
        default folders), without the pages whose summary is in ``exclude`` (counted as ``overlap_dropped``); None,
        with one log line, when no locale has translated pages."""
        try:
            queries, documents, manifest, dropped = manpage_sample(locales, max_queries, corpus_dir, man_dir, exclude)
        except ValueError as error:
            log.warning("probe: skipping ManpageRetrieval: %s", error)
            return None
        if not queries and locales is None:
            log.warning("probe: skipping ManpageRetrieval: no translated manual pages under %s (`make manpages` "
                        "installs Debian's)", manifest["man_dir"])
            return None
        if not queries:
            present = [language for language, counts in manifest["languages"].items() if counts["pairs"]]
            log.warning("probe: skipping ManpageRetrieval: no translated manual pages for probe.locales %s under "
                        "%s (languages with pages: %s; `make manpages` installs some)", locales, manifest["man_dir"],
                        ", ".join(present) or "none")
            return None
        task = cls(queries, documents, manifest["content_hash"])
        if exclude:
            task.overlap_dropped = {"pages": dropped}
            log.info("probe: left out %d manual pages whose normalised summary occurs in the training split", dropped)
        return task

    def load_data(self, num_proc: int | None = None, **kwargs) -> None:
        def document_id(page: TranslatedPage | EnglishPage) -> str:
            return f"{page.section}/{page.page}"

        queries = [(f"{language}/{document_id(page)}", page) for language, pages in self.queries.items()
                   for page in pages]
        documents = [page for pages in self.documents.values() for page in pages]
        candidates = {section: [document_id(page) for page in pages] for section, pages in self.documents.items()}
        self.dataset = {"default": {SPLIT: RetrievalSplitData(
            queries=Dataset.from_dict({"id": [qid for qid, _ in queries],
                                       "text": [page.summary for _, page in queries]}),
            corpus=Dataset.from_dict({"id": [document_id(page) for page in documents],
                                      "text": [page.text for page in documents], "title": [""] * len(documents)}),
            relevant_docs={qid: {document_id(page): 1} for qid, page in queries},
            top_ranked={qid: candidates[page.section] for qid, page in queries})}}
        self.data_loaded = True

    def probe_inputs(self) -> list[tuple[PromptType, str]]:
        return ([(PromptType.query, page.summary) for pages in self.queries.values() for page in pages]
                + [(PromptType.document, page.text) for pages in self.documents.values() for page in pages])


GETTEXT_TASKS = {"GettextBitextMining": GettextBitextMining, "GettextRetrieval": GettextRetrieval}
BUILTIN_TASKS = {**GETTEXT_TASKS, "ManpageRetrieval": ManpageRetrieval}


def check_task_names(names: list[str]) -> str | None:
    """None when every name is a built-in or an mteb registry task, else a one-line message naming the bad one."""
    for name in names:
        if name in BUILTIN_TASKS:
            continue
        try:
            mteb.get_task(name)
        except KeyError:
            return (f"unknown task {name!r}: neither a built-in ({', '.join(BUILTIN_TASKS)}) nor an mteb registry "
                    f"task (list them with `python -m mteb available-tasks`)")
    return None


def build_tasks(names: list[str], corpus_dir: str | Path, locales: list[str], max_pairs: int,
                whole_pool: bool = False, training_locales: list[str] | None = None,
                every_manpage_language: bool = False, max_pages: int | None = None) -> list[AbsTask]:
    """The configured tasks with their data loaded. A registry task whose data is not available locally (no
    hub access, not in the cache) is left out with one log line, and so is ManpageRetrieval when no locale has
    translated manual pages.

    The final evaluation's options: ``whole_pool`` makes GettextRetrieval search every held-out English sentence of
    the locales; with ``training_locales`` a gettext probe pair whose English or translation equals a text of those
    locales' training split (:func:`~datamodules.probe_corpus.normalised`: case, punctuation, whitespace) is left
    out, and so is such a pool sentence; the counts are logged and kept as each gettext task's
    ``overlap_dropped`` (``{locale: pairs}``, plus ``pool`` for the pool's sentences); ManpageRetrieval leaves out
    the pages whose summary is such a text (``{"pages": count}``). ``every_manpage_language``: ManpageRetrieval
    queries every language with translated manual pages here, not only ``locales``, up to ``max_pages`` each
    (default ``max_pairs``).
    """
    exclude = training_texts(corpus_dir, training_locales) if training_locales else set()
    pairs, dropped = ({}, {}) if not set(names) & set(GETTEXT_TASKS) else probe_sample(corpus_dir, locales, max_pairs,
                                                                                         exclude)
    pool = english_pool(corpus_dir, list(pairs), exclude) if whole_pool and pairs else []
    if training_locales and pairs:
        pool_dropped = len(english_pool(corpus_dir, list(pairs))) - len(pool) if whole_pool else 0
        dropped = {**dropped, **({"pool": pool_dropped} if whole_pool else {})}
        log.info("probe: left out %d held-out pairs (%s) and %d pool sentences whose normalised text occurs in the "
                 "training split of %s", sum(dropped[locale] for locale in pairs),
                 ", ".join(f"{locale} {count}" for locale, count in dropped.items() if locale != "pool"),
                 dropped.get("pool", 0), ", ".join(training_locales))
    revision = corpus_revision(corpus_dir)
    tasks = []
    for name in names:
        if name == "ManpageRetrieval":
            task = ManpageRetrieval.from_corpus(None if every_manpage_language else locales, max_pages or max_pairs,
                                                exclude=exclude)
            if task is None:
                continue
        elif name == "GettextRetrieval":
            task = GettextRetrieval(pairs, revision, pool)
        else:
            task = GETTEXT_TASKS[name](pairs, revision) if name in GETTEXT_TASKS else mteb.get_task(name)
        if name in GETTEXT_TASKS and training_locales:
            task.overlap_dropped = dropped
        try:
            task.load_data()
        except Exception as error:  # noqa: BLE001 - datasets raises many kinds for missing data
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            log.warning("probe: skipping mteb task %s: its data is not available locally (%s)", name, reason[:300])
            continue
        tasks.append(task)
    return tasks
