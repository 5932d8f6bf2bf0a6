"""A portable translation corpus: the gettext catalogs shipped inside the pinned ``django`` package (BSD).

The Debian catalogs under ``/usr/share/locale`` depend on the machine's image; Django's ~1,200 catalogs
(99 languages, ``django/conf/locale`` plus one ``locale`` folder per contrib app) are the same wherever
``django==5.2.19`` is installed. Its strings are short UI labels, so the English side is filtered with
lower bounds (2 words, 8 characters) than the Debian corpus; the rest of the pipeline (splits by English
hash, near-copy removal, manifest) is :func:`~datamodules.gettext_corpus.build_gettext_corpus`.

Django is optional: only ``data.corpus: django`` imports it, and its absence is one clear error.
"""

from __future__ import annotations

import logging
from pathlib import Path

from datamodules.gettext_corpus import build_gettext_corpus

log = logging.getLogger(__name__)

DJANGO_VERSION = "5.2.19"
INSTALL_HINT = f".venv/bin/pip install --no-deps django=={DJANGO_VERSION}"
MIN_WORDS = 2
MIN_CHARS = 8


def django_catalog_dirs() -> list[Path]:
    """The ``<locale>/LC_MESSAGES`` roots inside the installed django package, core first.

    Raises:
        ImportError: django is not installed (the message says how to install it).
    """
    try:
        import django
    except ImportError:
        raise ImportError(f"data.corpus=django needs the django package; install it with `{INSTALL_HINT}` "
                          "(only its translation catalogs are read)") from None
    if django.__version__ != DJANGO_VERSION:
        log.warning("django %s installed; the corpus is pinned to %s, counts may differ", django.__version__,
                    DJANGO_VERSION)
    package = Path(django.__file__).parent
    return [package / "conf" / "locale", *sorted(package.glob("contrib/*/locale"))]


def build_django_corpus(out_dir: str | Path, progress: bool = True, **options) -> dict:
    """Builds the Django corpus once into ``out_dir`` (same layout and manifest as the gettext corpus).

    Args:
        out_dir: target folder (``data/django`` by default in experiments).
        progress: show a progress bar over catalogs.
        options: passed on to :func:`~datamodules.gettext_corpus.build_gettext_corpus` (``locales``,
            ``probe_fraction``, ``test_fraction``, ``near_copy_threshold``, ``min_words``, ``min_chars``).

    Example:
        >>> manifest = build_django_corpus("data/django")
        >>> manifest["source"], manifest["locales"]["de"]["train"]
        ('django==5.2.19', 296)
    """
    options = {"min_words": MIN_WORDS, "min_chars": MIN_CHARS, **options}
    return build_gettext_corpus(out_dir, django_catalog_dirs(), progress=progress,
                                source=f"django=={DJANGO_VERSION}", **options)
