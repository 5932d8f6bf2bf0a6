"""Mid-training MTEB probes over the (layer × dim × rank) grid.

:class:`ProbeCallback` runs them during training; ``python -m callbacks.probe CKPT`` (``make probe``) probes a
checkpoint. mteb is imported lazily, inside an RNG guard: importing it reseeds the global generators.
"""

from callbacks.probe.callback import ProbeCallback, probe_corpus_dir
from callbacks.probe.prober import Prober, preserved_rng, preserved_state
from callbacks.probe.report import latest_table

__all__ = ["ProbeCallback", "Prober", "latest_table", "preserved_rng", "preserved_state", "probe_corpus_dir"]
