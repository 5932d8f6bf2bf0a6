"""``make bench`` item 9: how cost grows with the grid — training step time vs views, probe time vs cells, MEL
embedding time vs tokens and vs vocabulary. Each series is measured side by side (interleaved) in this process;
the slopes are least-squares fits in log-log space (1: linear, 0: flat), plotted to ``bench/results/growth.png``."""

from __future__ import annotations

import contextlib
import gc
import io
import math
from pathlib import Path

import torch

from bench.common import build_module, compare, compose_variant, trainable, weighted_loss
from bench.context import Context, row, train_step, training_batches
from lightning_modules.plugins.mel import FactorizedEmbedding

FOURTEEN_DIMS = "[384,352,320,288,256,224,192,160,128,96,64,32,16,8]"
# views = exits × widths × precision levels (MEL draws one rank per step: it adds no views).
VIEW_VARIANTS = {
    1: ["plugins.mll=null", "plugins.mrl=null"],
    7: ["plugins.mll=null"],
    21: [],
    42: ["plugins.precision={levels: [fp32, int8], min_bytes: 0}"],
    168: ["plugins.mll.layers=[1,2,3,4]", f"plugins.mrl.dims={FOURTEEN_DIMS}",
          "plugins.precision={levels: [fp32, int8, binary], min_bytes: 0}"],
}
# cells = exits × 7 widths × ranks, on the experiment's backbone cut to 5 blocks (so both exit ladders fit).
CELL_VARIANTS = {
    (3, 1): ["model.num_layers=5", "plugins.mll.layers=[1,3,5]", "plugins.mel.ranks=[128]"],
    (3, 2): ["model.num_layers=5", "plugins.mll.layers=[1,3,5]", "plugins.mel.ranks=[128,64]"],
    (5, 1): ["model.num_layers=5", "plugins.mll.layers=[1,2,3,4,5]", "plugins.mel.ranks=[128]"],
    (5, 2): ["model.num_layers=5", "plugins.mll.layers=[1,2,3,4,5]", "plugins.mel.ranks=[128,64]"],
}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def step_time_vs_views(ctx: Context) -> dict[int, float]:
    """Seconds per training step (one real batch) of each view count, interleaved."""
    steps, batch, views = {}, None, {}
    for count, overrides in VIEW_VARIANTS.items():
        config = compose_variant(ctx.args.experiment, [*overrides, f"model.max_length={ctx.args.max_length}"])
        module, tokenize = build_module(config, ctx.device)
        if batch is None:
            batch = {key: value.to(ctx.device) if isinstance(value, torch.Tensor) else value
                     for key, value in training_batches(config, tokenize, ctx.args.corpus, 1)[0].items()}
        with torch.no_grad():
            views[count] = len(module.views(batch, 0))
        steps[count] = train_step(module, batch, torch.optim.AdamW(trainable(module), lr=1e-5), [0])
    if views != {count: count for count in VIEW_VARIANTS}:
        raise RuntimeError(f"view variants produce {views} views, expected their keys")
    seconds = compare(steps, ctx.args.steps, ctx.device)
    del steps
    gc.collect()
    return seconds


def probe_time_vs_cells(ctx: Context) -> dict[int, float]:
    """Seconds per probe of each grid (``{cells: seconds}``; the experiment's tasks on ``--growth-probe-locales``),
    interleaved."""
    from evaluation.scoring import Prober, preserved_rng

    with preserved_rng():
        from evaluation.tasks import build_tasks

    probes, cells = {}, {}
    for (exits, ranks), overrides in CELL_VARIANTS.items():
        config = compose_variant(ctx.args.experiment, [*overrides, f"model.max_length={ctx.args.max_length}"])
        module, tokenize = build_module(config, ctx.device)
        with preserved_rng():
            tasks = build_tasks(list(config.probe.tasks), ctx.args.corpus, ctx.args.growth_probe_locales,
                                config.probe.max_pairs_per_locale)
        probes[exits, ranks] = Prober(module, tokenize, tasks, config.probe.batch_size,
                                      scoring_processes=config.probe.scoring_processes)
    step = [0]

    def probe(prober):
        def run():
            step[0] += 1
            with contextlib.redirect_stdout(io.StringIO()):
                table = prober.run(step[0])
            cells[id(prober)] = len(table["cells"])
        return run

    seconds = compare({key: probe(prober) for key, prober in probes.items()}, 1, ctx.device)
    result = {cells[id(probes[key])]: value for key, value in seconds.items()}
    del probes
    gc.collect()
    return result


def mel_step(ctx: Context, vocab: int, tokens: int):
    """MEL's embedding forward + backward (gather first) at rank ``--mel-rank`` and width ``--mel-dim``."""
    args, generator = ctx.args, torch.Generator().manual_seed(0)
    embedding = FactorizedEmbedding(torch.randn(vocab, args.mel_rank, generator=generator),
                                    torch.randn(args.mel_rank, args.mel_dim, generator=generator)).to(ctx.device)
    ids = torch.randint(vocab, (tokens,), generator=generator).to(ctx.device)
    upstream = torch.randn(tokens, args.mel_dim, generator=generator).to(ctx.device)

    def run():
        embedding.zero_grad(set_to_none=True)
        embedding(ids).backward(upstream)
    return run


def mel_time_vs_tokens(ctx: Context) -> dict[int, float]:
    steps = {tokens: mel_step(ctx, ctx.args.mel_vocab, tokens) for tokens in (1024, 4096, 16384)}
    return compare(steps, ctx.args.mel_repeats, ctx.device)


def mel_time_vs_vocabulary(ctx: Context) -> dict[int, float]:
    steps = {vocab: mel_step(ctx, vocab, ctx.args.mel_tokens) for vocab in (32_000, 151_936, 250_002)}
    return compare(steps, ctx.args.mel_repeats, ctx.device)


def plot(series: dict[str, dict[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(series), figsize=(4 * len(series), 3.5))
    for axis, (name, points) in zip(axes, series.items()):
        xs = sorted(points)
        base = points[xs[0]]
        axis.loglog(xs, [points[x] / base for x in xs], "o-", label=f"slope {slope(xs, [points[x] for x in xs]):.2f}")
        axis.loglog(xs, [x / xs[0] for x in xs], ":", color="grey", label="linear")
        axis.set_title(name, fontsize=9)
        axis.set_ylabel("time / time at the smallest")
        axis.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def item_growth(ctx: Context) -> list[dict]:
    """9. How cost grows with the grid: step time vs views, probe time vs cells, MEL time vs tokens and vocabulary
    (one log-log slope per series, with its table)."""
    args = ctx.args
    ctx.release(*list(ctx.modules))  # the variants below build their own
    series = {
        "training step vs views": step_time_vs_views(ctx),
        "probe vs cells": probe_time_vs_cells(ctx),
        f"MEL fwd+bwd vs tokens (vocab {args.mel_vocab:,})": mel_time_vs_tokens(ctx),
        f"MEL fwd+bwd vs vocabulary ({args.mel_tokens:,} tokens)": mel_time_vs_vocabulary(ctx),
    }
    plot_path = Path(args.out).parent / "growth.png"
    plot(series, plot_path)
    rows = []
    for index, (name, points) in enumerate(series.items()):
        xs = sorted(points)
        fitted = slope(xs, [points[x] for x in xs])
        table = ", ".join(f"{x:,}: {points[x]:.3f} s (×{points[x] / points[xs[0]]:.2f})" for x in xs)
        rows.append(row(f"9{'abcd'[index]}", f"log-log slope of {name}", fitted, None, None,
                        f"{table}; plot {plot_path}", seconds={str(x): points[x] for x in xs}))
    return rows
