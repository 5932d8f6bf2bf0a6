"""What the commands print: their own lines and one progress bar per long phase. The libraries' notices about
themselves (Lightning's device lines, tips and "stopped" line, MLflow's INFO lines, a deprecation inside Lightning,
bitsandbytes' note on a kernel package it does not need) are filtered where they are emitted, by logger level and by warning filters scoped to the known messages;
``--verbose`` leaves them as the libraries print them."""

from __future__ import annotations

import logging
import os
import warnings

VERBOSE_FLAG = "--verbose"

# Their INFO lines describe the libraries' own set-up: "GPU available", "TPU available", the litlogger tip,
# "`Trainer.fit` stopped", MLflow's database creation and its system-metrics monitor starting and stopping.
# Warnings and errors still show.
QUIET_LOGGERS = ("lightning.pytorch", "lightning.fabric")
MLFLOW_LEVEL_ENV = "MLFLOW_LOGGING_LEVEL"  # MLflow sets its loggers' level from it when imported

# (message regex, category): warnings about the stack's own internals, not about how this project uses it.
KNOWN_WARNINGS = (
    # Lightning 2.6's utilities/_pytree.py builds torch's deprecated LeafSpec on every batch transfer.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)
# (logger, message start): log records of the same kind. bitsandbytes on a CPU looks for an optional 4-bit matmul
# kernel package when imported (for adamw8bit); nothing here multiplies in 4 bits.
KNOWN_RECORDS = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward"),
)


def take_verbose(argv: list[str]) -> tuple[list[str], bool]:
    """``(argv without --verbose, whether it was there)``."""
    return [arg for arg in argv if arg != VERBOSE_FLAG], VERBOSE_FLAG in argv


def quiet_libraries() -> None:
    """Filters the notices named above at their source (call before the libraries print them). A level set in
    ``$MLFLOW_LOGGING_LEVEL`` is kept."""
    import lightning.pytorch  # noqa: F401 - its import sets its logger to INFO: set ours after it

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault(MLFLOW_LEVEL_ENV, "WARNING")  # for an import of mlflow still to come
    logging.getLogger("mlflow").setLevel(os.environ[MLFLOW_LEVEL_ENV].upper())  # for one already done
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, start in KNOWN_RECORDS:
        logging.getLogger(name).addFilter(lambda record, start=start: not record.getMessage().startswith(start))
