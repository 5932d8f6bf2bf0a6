import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

CATALOG_DIR = "/usr/share/locale"


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory):
    """The gettext corpus built once per test session (all locales, as training builds it)."""
    if not os.path.isdir(f"{CATALOG_DIR}/de/LC_MESSAGES"):
        pytest.skip(f"no gettext catalogs under {CATALOG_DIR}")
    from datamodules.gettext_corpus import build_gettext_corpus

    out = tmp_path_factory.mktemp("corpus") / "gettext"
    build_gettext_corpus(out, CATALOG_DIR, progress=False)
    return out


@pytest.fixture(scope="session")
def mlflow_dir(tmp_path_factory):
    """One MLflow store per session: creating a SQLite store takes seconds."""
    return tmp_path_factory.mktemp("mlruns")


def run_overrides(root, corpus_dir, mlflow_dir) -> list[str]:
    """Overrides that put a run's checkpoints under ``root``, its corpus and MLflow store in the session's.
    MTEB probes are off (seconds per probe); tests/integration/test_probe*.py switch them on."""
    return [f"output_dir={root}/outputs", f"data.dir={corpus_dir}", f"tracking.uri=sqlite:///{mlflow_dir}/mlflow.db",
            f"tracking.artifact_dir={mlflow_dir}/artifacts", "trainer.enable_progress_bar=false", "probe.enabled=false"]


@pytest.fixture
def tiny_config(tmp_path, corpus_dir, mlflow_dir):
    """``compose(name, overrides)`` writing checkpoints under this test's tmp_path, MLflow in the session store."""
    from experiments.config import compose

    def make(name: str = "tiny", overrides: list[str] | None = None):
        return compose(name, [*run_overrides(tmp_path, corpus_dir, mlflow_dir), *(overrides or [])])

    return make
