"""Bench item 12: do measured encode latencies of exported cells order like their analytic FLOPs per token?"""

from __future__ import annotations

import gc
import itertools

from bench.common import compare
from bench.context import row
from contracts.cells import axis_values
from experiments.latency import probe_texts
from lightning_modules.costs import cell_cost
from lightning_modules.embedding_model import EmbeddingModel
from lightning_modules.cell_export import Origin, export_cell, load_exported

CLEAR_RATIO = 1.25
"""Pairs of cells whose FLOPs differ by at least this factor must be ordered alike by latency (closer pairs are
reported, not judged: on a shared CPU their order is noise)."""


def item_cell_costs(ctx) -> list[dict]:
    """12. Exported depth x FFN-width cells: measured encode latency (probe-length texts, batch 32) against the
    analytic FLOPs per token of lightning_modules.costs; every pair with FLOPs >= 1.25x apart ordered alike."""
    module, tokenize, config = ctx.module("3d-ml+ffn")
    module.eval()
    model = EmbeddingModel(module, tokenize)
    origin = Origin(config.name, config.model.source, None, 0, None)  # the experiment's initial weights
    values = axis_values(model.cells())
    cells = [model.cell(layer=layer, ffn=width) for layer, width in itertools.product(values["layer"], values["ffn"])]
    flops = {cell.name: cell_cost(module, cell, tokenize.max_length).flops_per_token for cell in cells}
    models = {cell.name: load_exported(export_cell(model, ctx.work_dir / cell.name.replace("/", "-"), cell, origin,
                                                   overwrite=True).path).to(ctx.device) for cell in cells}
    module.train()
    texts = probe_texts(config, ctx.args.throughput_texts)
    encode = {name: (lambda model=model: model.encode(texts, batch_size=ctx.args.encode_batch_size))
              for name, model in models.items()}
    seconds = compare(encode, ctx.args.throughput_repeats, ctx.device)
    pairs = [(a, b) for a, b in itertools.combinations(flops, 2) if flops[a] != flops[b]]
    concordant = sum((flops[a] - flops[b]) * (seconds[a] - seconds[b]) > 0 for a, b in pairs)
    clear = [(a, b) for a, b in pairs if max(flops[a], flops[b]) / min(flops[a], flops[b]) >= CLEAR_RATIO]
    clear_agree = sum((flops[a] - flops[b]) * (seconds[a] - seconds[b]) > 0 for a, b in clear)
    order = sorted(flops, key=flops.get)
    detail = "; ".join(f"{name}: {flops[name] / 1e6:.2f} MFLOPs/token, {1e6 * seconds[name] / len(texts):.0f} ms/1k"
                       for name in order)
    del models
    ctx.release("3d-ml+ffn")
    gc.collect()
    return [row("12", "latency order = FLOPs order (pairs >= 1.25x apart)", clear_agree / len(clear), "= 1.00",
                clear_agree == len(clear), f"{clear_agree}/{len(clear)} clear pairs, {concordant}/{len(pairs)} of all "
                f"pairs; {len(texts)} probe texts, batch {ctx.args.encode_batch_size}: {detail}",
                flops=flops, seconds=seconds)]
