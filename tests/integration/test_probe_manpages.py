"""The ManpageRetrieval probe task: its qrels from a fake man tree, its scores for hand-built embeddings, and the one
line it logs when it cannot run."""

import logging
import math

import pytest

from evaluation.scoring import preserved_rng
from datamodules import manpages_corpus
from tests.unit.test_manpages_corpus import page_source, write_page
from tests.integration.test_probe import META, hand_encoder, one_hot

with preserved_rng():  # mteb reseeds the global generators on import
    from evaluation.grid import CellModel, evaluate
    from evaluation.tasks import ManpageRetrieval, build_tasks, check_task_names


@pytest.fixture
def man_dir(tmp_path):
    """English man1 (ls, sort, cat, tr) and man5 (fstab, passwd); German ls, sort, fstab; French ls."""
    man = tmp_path / "man"
    for name, summary in [("ls", "list directory contents"), ("sort", "sort lines of text files"),
                          ("cat", "concatenate files"), ("tr", "translate or delete characters")]:
        write_page(man, f"man1/{name}.1.gz", page_source(name, summary, f"About {name}."))
    write_page(man, "man5/fstab.5.gz", page_source("fstab", "static information about the filesystems"))
    write_page(man, "man5/passwd.5.gz", page_source("passwd", "the password file"))
    write_page(man, "de/man1/ls.1.gz", page_source("ls", "Verzeichnisinhalte auflisten"))
    write_page(man, "de/man1/sort.1.gz", page_source("sort", "Zeilen von Textdateien sortieren"))
    write_page(man, "de/man5/fstab.5.gz", page_source("fstab", "statische Informationen über Dateisysteme"))
    write_page(man, "fr/man1/ls.1.gz", page_source("ls", "lister le contenu des répertoires"))
    return man


def test_qrels_link_each_translated_summary_to_its_english_page_among_its_section(man_dir, tmp_path):
    task = ManpageRetrieval.from_corpus(["de", "fr", "kk"], 10, tmp_path / "corpus", man_dir)
    assert task.metadata.eval_langs == ["deu-Latn", "eng-Latn", "fra-Latn"]
    data = task.dataset["default"]["probe"]
    assert dict(zip(data["queries"]["id"], data["queries"]["text"])) == {
        "de/man1/ls.1": "Verzeichnisinhalte auflisten", "de/man1/sort.1": "Zeilen von Textdateien sortieren",
        "de/man5/fstab.5": "statische Informationen über Dateisysteme",
        "fr/man1/ls.1": "lister le contenu des répertoires"}
    assert data["relevant_docs"] == {"de/man1/ls.1": {"man1/ls.1": 1}, "de/man1/sort.1": {"man1/sort.1": 1},
                                  "de/man5/fstab.5": {"man5/fstab.5": 1}, "fr/man1/ls.1": {"man1/ls.1": 1}}
    documents = dict(zip(data["corpus"]["id"], data["corpus"]["text"]))
    assert documents["man1/ls.1"] == "ls - list directory contents. About ls."
    # Each query is ranked among the pages of its own section only: man1 has 2 relevant pages × 4 ≥ all 4 pages.
    man1 = ["man1/cat.1", "man1/ls.1", "man1/sort.1", "man1/tr.1"]
    assert {qid: sorted(candidates) for qid, candidates in data["top_ranked"].items()} == {
        "de/man1/ls.1": man1, "de/man1/sort.1": man1, "fr/man1/ls.1": man1,
        "de/man5/fstab.5": ["man5/fstab.5", "man5/passwd.5"]}
    assert sorted(documents) == sorted(man1 + ["man5/fstab.5", "man5/passwd.5"])
    assert task.metadata.dataset["revision"] == \
        manpages_corpus.build_manpage_corpus(tmp_path / "corpus", man_dir)["content_hash"]


def test_scores_of_hand_built_embeddings_rank_within_the_section(man_dir, tmp_path):
    write_page(man_dir, "man5/group.5.gz", page_source("group", "user group file"))
    write_page(man_dir, "de/man5/group.5.gz", page_source("group", "Gruppendatei"))
    task = ManpageRetrieval.from_corpus(["de"], 10, tmp_path / "corpus", man_dir)
    text = {(page.section, page.page): page.text for pages in task.documents.values() for page in pages}
    vectors = {f"p: {text['man1', name]}": one_hot(i) for i, name in enumerate(["ls.1", "sort.1", "cat.1", "tr.1"])}
    vectors.update({f"p: {text['man5', 'fstab.5']}": [0, 0, 0.6, 0.8],
                    f"p: {text['man5', 'passwd.5']}": [0.6, 0.8, 0, 0],
                    f"p: {text['man5', 'group.5']}": [0.8, 0, 0.6, 0]})
    # Ranks among the query's own section; among all pages fstab's query would find tr first and group's would
    # come 4th (behind sort, passwd and ls).
    vectors.update({"q: Verzeichnisinhalte auflisten": one_hot(0),                       # rank 1
                    "q: Zeilen von Textdateien sortieren": [0.9, 0.8, 0, 0],             # rank 2, behind ls
                    "q: statische Informationen über Dateisysteme": [0, 0, 0, 1],        # rank 1
                    "q: Gruppendatei": [0.6, 0.8, 0.1, 0]})                              # rank 2, behind passwd
    roles = {text: role for role, text in task.probe_inputs()}
    scores = evaluate(CellModel(hand_encoder(vectors), 0, META, may_encode=False, roles=roles), task, 8)
    assert scores["main_score"] == pytest.approx((1 + 1 / math.log2(3)) / 2, abs=1e-5)
    assert scores["recall_at_1"] == pytest.approx(0.5)


def test_no_translated_pages_skip_the_task_with_one_line(man_dir, tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(manpages_corpus, "CORPUS_DIR", str(tmp_path / "corpus"))
    monkeypatch.setattr(manpages_corpus, "MAN_DIR", str(man_dir))
    assert check_task_names(["ManpageRetrieval"]) is None
    with caplog.at_level(logging.WARNING, logger="evaluation.tasks"):
        assert build_tasks(["ManpageRetrieval"], tmp_path / "no-gettext-corpus", ["kk", "ta"], 8) == []
    assert [record.getMessage() for record in caplog.records] == [
        f"probe: skipping ManpageRetrieval: no translated manual pages for probe.locales ['kk', 'ta'] under "
        f"{man_dir} (languages with pages: de, fr; `make manpages` installs some)"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="evaluation.tasks"):
        assert ManpageRetrieval.from_corpus(["de"], 8, tmp_path / "other", tmp_path / "no-man-tree") is None
    assert len(caplog.records) == 1
    assert caplog.records[0].getMessage().startswith("probe: skipping ManpageRetrieval: cannot build the "
                                                     "manual-page corpus")
    assert [task.metadata.name for task in build_tasks(["ManpageRetrieval"], tmp_path, ["de"], 8)] == \
        ["ManpageRetrieval"]


def test_a_man_tree_without_translations_skips_the_task_with_one_line(tmp_path, caplog):
    english_only = tmp_path / "man"
    write_page(english_only, "man1/ls.1.gz", page_source("ls", "list directory contents"))
    with caplog.at_level(logging.WARNING, logger="evaluation.tasks"):
        assert ManpageRetrieval.from_corpus(["de", "fr"], 8, tmp_path / "corpus", english_only) is None
    assert [record.getMessage() for record in caplog.records] == [
        f"probe: skipping ManpageRetrieval: no translated manual pages for probe.locales ['de', 'fr'] under "
        f"{english_only} (languages with pages: none; `make manpages` installs some)"]


def test_the_final_evaluation_queries_every_language_and_leaves_out_training_texts(man_dir, tmp_path):
    # Every language with pages (de, fr); a summary whose normalised text (case, punctuation, whitespace) is a
    # training text is not a query, and is counted.
    every = ManpageRetrieval.from_corpus(None, 10, tmp_path / "corpus", man_dir)
    assert sorted(every.queries) == ["de", "fr"] and not hasattr(every, "overlap_dropped")
    task = ManpageRetrieval.from_corpus(None, 10, tmp_path / "corpus", man_dir,
                                        exclude={"verzeichnisinhalte auflisten"})
    assert sorted(page.page for page in task.queries["de"]) == ["fstab.5", "sort.1"]
    assert [page.page for page in task.queries["fr"]] == ["ls.1"] and task.overlap_dropped == {"pages": 1}
    # Only the queries change: the English pages of their sections stay the candidates.
    assert {section: len(pages) for section, pages in task.documents.items()} == {"man1": 4, "man5": 2}
