"""The final evaluation's sets: every held-out English sentence as the retrieval pool, and probe texts that occur in
the training split (after normalising case, punctuation and whitespace) left out and counted."""

import json
import logging

import pytest

from datamodules.probe_corpus import english_pool, normalised, training_texts
from evaluation.config import FinalEvalConfig
from evaluation.scoring import preserved_rng

with preserved_rng():
    from evaluation.tasks import build_tasks


def write_split(root, split, locale, pairs):
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{locale}.jsonl").write_text("".join(json.dumps({"en": en, "xx": xx, "catalog": "c"}) + "\n"
                                                    for en, xx in pairs))


@pytest.fixture
def corpus(tmp_path):
    write_split(tmp_path, "train", "de", [("Save the file", "Datei speichern")])
    write_split(tmp_path, "probe", "de", [("save the FILE!", "Sichern"),          # its English is a training text
                                          ("Open a window", "datei  speichern."),  # its translation is one
                                          ("Close all tabs", "Alle Tabs schließen"), ("Quit now", "Jetzt beenden")])
    write_split(tmp_path, "probe", "fr", [("Print the page", "Imprimer la page"), ("Undo the change", "Annuler"),
                                          ("Save the file.", "Enregistrer")])  # leaks, from another locale
    return tmp_path


def test_normalised_text_ignores_case_punctuation_and_spacing():
    assert normalised("  Save the FILE…  now! ") == "save the file now"
    assert normalised("l'écran") == normalised("L ÉCRAN")
    assert training_texts("/nonexistent", ["de"]) == set()


def test_leaked_pairs_and_pool_sentences_are_left_out_and_counted(corpus, caplog):
    with caplog.at_level(logging.INFO, logger="evaluation.tasks"), preserved_rng():
        retrieval, bitext = build_tasks(["GettextRetrieval", "GettextBitextMining"], corpus, ["de", "fr"], 200,
                                        whole_pool=True, training_locales=["de"])
    # Pool: the two English sentences equal to "Save the file" go; "Open a window" stays (only its translation
    # leaked, and a document is English).
    assert retrieval.overlap_dropped == bitext.overlap_dropped == {"de": 2, "fr": 1, "pool": 2}
    assert {locale: {pair.en for pair in pairs} for locale, pairs in bitext.pairs.items()} == {
        "de": {"Close all tabs", "Quit now"}, "fr": {"Print the page", "Undo the change"}}
    assert retrieval.english == ["Close all tabs", "Open a window", "Print the page", "Quit now", "Undo the change"]
    assert "left out 3 held-out pairs (de 2, fr 1) and 2 pool sentences" in caplog.text


def test_the_whole_pool_holds_sentences_beyond_the_sampled_queries(corpus):
    with preserved_rng():
        (retrieval,) = build_tasks(["GettextRetrieval"], corpus, ["de", "fr"], 1, whole_pool=True)
    assert sum(len(pairs) for pairs in retrieval.pairs.values()) == 2  # one query per locale
    assert retrieval.english == english_pool(corpus, ["de", "fr"]) and len(retrieval.english) == 7
    assert not hasattr(retrieval, "overlap_dropped")
    with preserved_rng():
        (cheap,) = build_tasks(["GettextRetrieval"], corpus, ["de", "fr"], 1)
    assert len(cheap.english) == 2  # the mid-training probe: the sampled pairs' sources only


def test_the_default_final_evaluation_is_sized_for_one_point_differences():
    final = FinalEvalConfig()
    assert len(final.locales) >= 10 and final.max_pairs_per_locale >= 200
    assert final.whole_pool and final.drop_training_overlap
