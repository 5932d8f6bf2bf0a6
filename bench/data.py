"""``python -m bench.data [NAME] [key=value ...]`` (``make bench-data``): data-loader speed, padding,
and data-wait share.

1. The loader alone, in this process (= one DataLoader worker): batches and tokenized pairs per second, and
   the padding fraction, with length bucketing off and on, over the experiment's data and tokenizer; the table
   says whether batches are packed (``data.packing``, on by default) or padded.
2. A short training run of the experiment (``--steps``, fresh run in a temporary folder): the share of step
   time the training loop spent waiting for data (``run/data/device/wait_fraction``, start-up batch excluded).

Example:
    .venv/bin/python -m bench.data quickstart --steps 20 --batches 200
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time


def loader_speed(config, batches: int) -> dict[str, float]:
    """Batches/s, pairs/s and mean padding fraction of ``batches`` batches, read and tokenized in this process."""
    from experiments.run import build

    _, datamodule = build(config)
    datamodule.prepare_data()
    datamodule.setup("fit")
    iterator = iter(datamodule.train_dataloader())
    next(iterator)  # the first pool is read here; not part of the steady state
    started, padding, pairs = time.perf_counter(), 0.0, 0
    for batch in itertools.islice(iterator, batches):
        padding += batch["padding_fraction"]
        pairs += batch["num_queries"]
    seconds = time.perf_counter() - started
    return {"batches_per_s": batches / seconds, "pairs_per_s": pairs / seconds, "padding": padding / batches}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.data", description=__doc__.split("\n\n")[0])
    parser.add_argument("name", nargs="?", default="quickstart", help="experiment (default: quickstart)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    parser.add_argument("--batches", type=int, default=200, help="batches timed per loader setting")
    parser.add_argument("--steps", type=int, default=20, help="training steps for the data-wait share (0: skip)")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
    from experiments.config import compose
    from experiments.run import train

    base = [*args.overrides, "data.num_workers=0"]
    packing = "on" if compose(args.name, base).data.packing else "off"
    print(f"loader alone, {args.name} data, one process = one worker, {args.batches} batches:")
    print(f"  {'packing':<8} {'bucketing':<10} {'batches/s':>10} {'pairs/s':>10} {'padding':>8}")
    for bucketing in ("false", "true"):
        speed = loader_speed(compose(args.name, [*base, f"data.bucketing={bucketing}"]), args.batches)
        print(f"  {packing:<8} {bucketing:<10} {speed['batches_per_s']:>10.1f} {speed['pairs_per_s']:>10.0f} "
              f"{speed['padding']:>8.3f}")
    if packing == "on":
        print("  (bucketing sorts each pool by length: it lowers padding in padded batches, data.packing=false; packed "
              "rows fill best with mixed lengths)")
    if args.steps:
        with tempfile.TemporaryDirectory() as scratch:
            config = compose(args.name, [*args.overrides, f"trainer.max_steps={args.steps}", "resume=false",
                                         f"output_dir={scratch}/outputs", f"tracking.uri=sqlite:///{scratch}/mlflow.db",
                                         f"tracking.artifact_dir={scratch}/artifacts"])
            result = train(config)
        print(f"training, {args.name}, {args.steps} steps, data.num_workers={config.data.num_workers}: data wait "
              f"{100 * result.metrics['run/data/device/wait_fraction']:.2f} % of step time (last step waited "
              f"{1000 * result.metrics['run/data/device/wait_s']:.1f} ms)")


if __name__ == "__main__":
    main()
