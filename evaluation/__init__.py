"""The evaluation library: MTEB probes over the (layer × dim × rank) grid, their reports and comparisons, and the
quality-versus-cost frontier of a run's cells (:mod:`evaluation.pareto`).

:class:`ProbeSession` probes during training (for :class:`callbacks.probe_schedule.ProbeCallback`); ``python -m
experiments.probe CKPT`` (``make probe``) probes a checkpoint. Imports are lazy: the probe command must switch the hub offline before anything imports
huggingface_hub, and mteb is only imported inside an RNG guard (it reseeds the global generators on import).
"""

import importlib

_EXPORTS = {"ProbeSession": "probing", "probe_corpus_dir": "probing", "Prober": "scoring",
            "preserved_rng": "scoring", "preserved_state": "scoring", "latest_table": "report"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
