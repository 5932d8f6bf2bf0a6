"""The ten benchmark items of ``make bench`` (:data:`ITEMS`). Each returns result rows: ``{"item", "name", "ratio",
"goal", "met", "detail", "raw"}``, where ``ratio`` always compares two things measured side by side in this process
(or this run)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys

import torch

from bench.common import compare, to_device, trainable, weighted_loss
from bench.context import VARIANTS, Context, packed, row, train_step, training_batches
from bench.gradient_caching import item_gradient_cache
from bench.growth import item_growth
from contracts.cells import axis_values
from lightning_modules.embedding_model import EmbeddingModel
from lightning_modules.cell_export import Origin, export_cell, load_exported
from lightning_modules.plugins.mel import FactorizedEmbedding

def item_training_step(ctx: Context) -> list[dict]:
    """1. A training step with the Matryoshka views (and MEL) vs a plain contrastive step: same model and batch."""
    steps = {}
    for variant in VARIANTS:
        module, tokenize, _ = ctx.module(variant)
        optimizer = torch.optim.AdamW(trainable(module), lr=1e-5)
        steps[variant] = train_step(module, ctx.batch(tokenize), optimizer, [0])
    seconds = compare(steps, ctx.args.steps, ctx.device)
    axes = axis_values(ctx.module("3d-ml")[0].cells())
    views = len(axes["layer"]) * len(axes["dim"])
    detail = (f"{ctx.args.experiment} model, batch {ctx.args.batch_size} pairs, max {ctx.args.max_length} tokens, "
              f"AdamW; s/step: plain {seconds['plain']:.3f}, MLL+MRL {seconds['mll+mrl']:.3f}, "
              f"MLL+MRL+MEL {seconds['3d-ml']:.3f} ({views} views)")
    ratio_3d, ratio_views = seconds["3d-ml"] / seconds["plain"], seconds["mll+mrl"] / seconds["plain"]
    return [row("1", "3D-ML step / plain step", ratio_3d, "≤ 1.10", ratio_3d <= 1.10, detail, seconds=seconds),
            row("1b", "MLL+MRL step / plain step (no MEL)", ratio_views, "≤ 1.10", ratio_views <= 1.10, detail,
                seconds=seconds)]


def item_mel_gather(ctx: Context) -> list[dict]:
    """2. MEL embedding forward+backward: gather rows first vs the reference's materialise-then-index."""
    args = ctx.args
    generator = torch.Generator().manual_seed(0)
    embedding = FactorizedEmbedding(torch.randn(args.mel_vocab, args.mel_rank, generator=generator),
                                    torch.randn(args.mel_rank, args.mel_dim, generator=generator)).to(ctx.device)
    ids = torch.randint(args.mel_vocab, (args.mel_tokens,), generator=generator).to(ctx.device)
    upstream = torch.randn(args.mel_tokens, args.mel_dim, generator=generator).to(ctx.device)

    def step(forward):
        def run():
            embedding.zero_grad(set_to_none=True)
            forward(ids).backward(upstream)
            return embedding.left.grad, embedding.right.grad
        return run

    gather, materialise = step(embedding.forward), step(embedding.forward_materialized)
    # Same result both ways (the speed-up is not bought with a different computation).
    left, right = (grad.clone() for grad in gather())
    reference_left, reference_right = materialise()
    agree = bool(torch.allclose(left, reference_left, rtol=1e-4, atol=1e-3)
                 and torch.allclose(right, reference_right, rtol=1e-4, atol=1e-2))
    seconds = compare({"gather": gather, "materialise": materialise}, args.mel_repeats, ctx.device,
                      warmup=0)  # both ran once above
    ratio = seconds["materialise"] / seconds["gather"]
    detail = (f"vocab {args.mel_vocab:,}, r {args.mel_rank}, d {args.mel_dim}, {args.mel_tokens:,} tokens: "
              f"gather {seconds['gather'] * 1e3:.1f} ms, materialise {seconds['materialise'] * 1e3:.1f} ms; "
              f"gradients agree: {agree}")
    del embedding, left, right, reference_left, reference_right
    gc.collect()
    return [row("2", "MEL fwd+bwd: materialise / gather-first", ratio, "≥ 10×", ratio >= 10, detail,
                seconds=seconds, gradients_agree=agree)]


@torch.no_grad()
def item_probe_grid(ctx: Context) -> list[dict]:
    """3. Embeddings of every cell: one encoding per model-side setting (all exits from one forward, dims by
    slicing) vs a naive loop that encodes the texts once per cell."""
    module, tokenize, _ = ctx.module("3d-ml")
    module.eval()
    texts = [text for pair in ctx.pairs(ctx.args.probe_texts // 2) for text in pair]
    size = ctx.args.encode_batch_size
    batches = [to_device(tokenize.encode(texts[start: start + size]), ctx.device)
               for start in range(0, len(texts), size)]
    cells = module.cells()
    encodes = {"per_setting": 0, "per_cell": 0}
    results: dict[str, dict] = {"per_setting": {}, "per_cell": {}}

    def encode(wanted):
        parts = [module.encode(batch["input_ids"], batch["attention_mask"], wanted) for batch in batches]
        return {cell.name: torch.cat([part[cell.name] for part in parts]) for cell in wanted}

    def per_setting():
        for setting in module.settings():
            results["per_setting"] |= encode([cell for cell in cells if module.setting_of(cell) == setting])
            encodes["per_setting"] += 1

    def per_cell():
        for cell in cells:
            results["per_cell"] |= encode([cell])
            encodes["per_cell"] += 1

    seconds = compare({"per_setting": per_setting, "per_cell": per_cell}, 1, ctx.device, warmup=0)
    difference = max((results["per_setting"][cell.name] - results["per_cell"][cell.name]).abs().max().item()
                     for cell in cells)
    module.train()
    ratio = seconds["per_cell"] / seconds["per_setting"]
    axes = axis_values(cells)
    detail = (f"{len(cells)} cells ({' × '.join(f'{len(values)} {tag}' for tag, values in axes.items())}), "
              f"{len(texts)} texts: encodes {encodes['per_setting']} vs {encodes['per_cell']}; "
              f"{seconds['per_setting']:.2f} s vs {seconds['per_cell']:.2f} s; max |difference| {difference:.1e}")
    return [row("3", "grid probe encoding: per-cell loop / one pass per model-side setting", ratio, None, None,
                detail, seconds=seconds, encodes=encodes, cells=len(cells), max_difference=difference)]


def item_export_throughput(ctx: Context) -> list[dict]:
    """4. Encoding throughput (sentence-transformers ``encode``) of an exported depth-l model vs the full depth."""
    module, tokenize, config = ctx.module("3d-ml")
    module.eval()
    model = EmbeddingModel(module, tokenize)
    origin = Origin(config.name, config.model.source, None, 0, None)  # the experiment's initial weights
    depth = module.backbone.info.num_layers
    models = {layers: load_exported(export_cell(model, ctx.work_dir / f"l{layers}", model.cell(layer=layers), origin,
                                                overwrite=True).path).to(ctx.device)
              for layers in (depth, *ctx.args.export_layers)}
    module.train()
    texts = [text for pair in ctx.pairs(ctx.args.throughput_texts // 2) for text in pair]
    encode = {layers: (lambda model=model: model.encode_query(texts, batch_size=ctx.args.encode_batch_size))
              for layers, model in models.items()}
    seconds = compare(encode, ctx.args.throughput_repeats, ctx.device)
    rows = []
    for layers in ctx.args.export_layers:
        ratio, goal = seconds[depth] / seconds[layers], 0.8 * depth / layers
        detail = (f"{len(texts)} texts, batch {ctx.args.encode_batch_size}: {len(texts) / seconds[layers]:.0f} texts/s "
                  f"at depth {layers} vs {len(texts) / seconds[depth]:.0f} at depth {depth}")
        rows.append(row("4", f"throughput depth {layers} / depth {depth}", ratio, f"≥ {goal:.2f} (0.8·L/l)",
                        ratio >= goal, detail, seconds={str(key): value for key, value in seconds.items()}))
    del models
    gc.collect()
    return rows


def item_vs_sentence_transformers(ctx: Context) -> list[dict]:
    """5. Our MLL+MRL loss step vs sentence-transformers' ``Matryoshka2dLoss``: same backbone, batch and dims."""
    from sentence_transformers.sentence_transformer.losses import Matryoshka2dLoss, MultipleNegativesRankingLoss

    module, tokenize, config = ctx.module("mll+mrl")
    axes = axis_values(module.cells())
    module.eval()  # export copies the weights; the same backbone then trains on both sides
    model = EmbeddingModel(module, tokenize)
    st_model = load_exported(export_cell(model, ctx.work_dir / "export-st", model.full_cell(),
                                         Origin(config.name, config.model.source, None, 0, None),
                                         overwrite=True).path).to(ctx.device).train()
    module.train()
    # The same number of exits per step (ST samples its prior layers), every dim, MNRL scale 1/τ = our in-batch loss.
    st_loss = Matryoshka2dLoss(st_model, MultipleNegativesRankingLoss(st_model, scale=1 / config.loss.temperature),
                               matryoshka_dims=axes["dim"], n_layers_per_step=len(axes["layer"]) - 1,
                               n_dims_per_step=-1)
    pairs = ctx.pairs(ctx.args.batch_size)
    features = [to_device(st_model.preprocess([prefix + text for text in texts]), ctx.device)
                for prefix, texts in ((tokenize.query_prefix, [xx for xx, _ in pairs]),
                                      (tokenize.passage_prefix, [en for _, en in pairs]))]
    st_optimizer = torch.optim.AdamW(trainable(st_model), lr=1e-5)

    def st_step():
        st_optimizer.zero_grad(set_to_none=True)
        st_loss(features, None).backward()
        st_optimizer.step()

    ours = train_step(module, ctx.batch(tokenize), torch.optim.AdamW(trainable(module), lr=1e-5), [0])
    seconds = compare({"ours": ours, "sentence_transformers": st_step}, ctx.args.steps, ctx.device)
    ratio = seconds["ours"] / seconds["sentence_transformers"]
    detail = (f"exits {axes['layer']} (ST: {len(axes['layer']) - 1} sampled prior layers + last), dims "
              f"{axes['dim']}, batch {ctx.args.batch_size}: ours {seconds['ours']:.3f} s, "
              f"Matryoshka2dLoss {seconds['sentence_transformers']:.3f} s per step")
    del st_model, st_loss, st_optimizer
    gc.collect()
    return [row("5", "our MLL+MRL loss step / ST Matryoshka2dLoss step", ratio, "< 1 (faster)", ratio < 1, detail,
                seconds=seconds)]


def item_memory(ctx: Context) -> list[dict]:
    """6. Peak memory of a training step and parameter counts with and without MEL (each variant in its own process,
    one after the other in this run, so one peak cannot hide the other)."""
    args = ctx.args
    measured = {}
    for variant in ("mll+mrl", "3d-ml"):
        command = [sys.executable, "-m", "bench.memory", "--experiment", args.experiment, "--variant", variant,
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--device", str(ctx.device), "--corpus", args.corpus, "--threads", str(torch.get_num_threads())]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            raise RuntimeError(f"bench.memory {variant} failed:\n{completed.stderr[-2000:]}")
        measured[variant] = json.loads(completed.stdout.strip().splitlines()[-1])
    without, with_mel = measured["mll+mrl"], measured["3d-ml"]
    ratio = with_mel["peak_bytes"] / without["peak_bytes"]
    mib = 2**20
    memory = (f"peak {with_mel['peak_kind']} over {ctx.args.batch_size}-pair training steps: "
              f"{with_mel['peak_bytes'] / mib:.0f} MiB with MEL vs {without['peak_bytes'] / mib:.0f} MiB without")
    counts = (f"trainable {with_mel['trainable'] / 1e6:.1f} M vs {without['trainable'] / 1e6:.1f} M, of which token "
              f"embedding {with_mel['embedding'] / 1e6:.1f} M vs {without['embedding'] / 1e6:.1f} M")
    parameter_ratio = with_mel["trainable"] / without["trainable"]
    return [row("6", "peak memory with MEL / without", ratio, None, None, memory, measured=measured),
            row("6b", "trainable parameters with MEL / without", parameter_ratio, None, None, counts)]


def item_optimizer_state(ctx: Context) -> list[dict]:
    """7. Optimizer-state bytes of bitsandbytes' 8-bit AdamW vs 32-bit AdamW on the 3D-ML model, after one step."""
    from omegaconf import OmegaConf

    from lightning_modules.optim import build_optimizer, optimizer_state_bytes

    module, tokenize, config = ctx.module("3d-ml")
    batch, parameters = ctx.batch(tokenize), sum(p.numel() for p in trainable(module))
    state_bytes = {}
    for name in ("adamw", "adamw8bit"):
        optimizer = build_optimizer(module, OmegaConf.merge(config.optim, {"name": name}))
        train_step(module, batch, optimizer, [0])()  # state is allocated at the first step
        state_bytes[name] = optimizer_state_bytes(optimizer)
        del optimizer
    ratio = state_bytes["adamw8bit"] / state_bytes["adamw"]
    mib = 2**20
    detail = (f"{parameters / 1e6:.1f} M trainable parameters: adamw {state_bytes['adamw'] / mib:.1f} MiB "
              f"({state_bytes['adamw'] / parameters:.2f} B/param), adamw8bit {state_bytes['adamw8bit'] / mib:.1f} MiB "
              f"({state_bytes['adamw8bit'] / parameters:.2f} B/param)")
    return [row("7", "optimizer state: adamw8bit / adamw", ratio, None, None, detail, state_bytes=state_bytes,
                parameters=parameters)]


def item_packing(ctx: Context) -> list[dict]:
    """8. Tokens/s of a training step on real batches of the experiment, packed (data.packing) vs padded."""
    module, tokenize, config = ctx.module("3d-ml")
    batches = training_batches(config, tokenize, ctx.args.corpus, ctx.args.packing_batches)
    variants = {"padded": [to_device(batch, ctx.device) for batch in batches],
                "packed": [to_device(packed(batch, tokenize.pad_id), ctx.device) for batch in batches]}
    tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    padding = {name: 1 - tokens / sum(batch["input_ids"].numel() for batch in group) for name, group in variants.items()}
    module.eval()  # the same objective both ways: no dropout; MEL's rank is drawn from the step (0 on both sides)
    with torch.no_grad():
        losses = {name: [weighted_loss(module, batch, 0).item() for batch in group] for name, group in variants.items()}
    module.train()
    loss_difference = max(abs(a - b) for a, b in zip(losses["padded"], losses["packed"]))
    optimizer = torch.optim.AdamW(trainable(module), lr=1e-5)

    def steps(group: list[dict]):
        runs = [train_step(module, batch, optimizer, [0]) for batch in group]
        return lambda: [run() for run in runs]

    seconds = compare({name: steps(group) for name, group in variants.items()}, ctx.args.steps, ctx.device)
    rate = {name: tokens / value for name, value in seconds.items()}
    ratio = rate["packed"] / rate["padded"]
    shapes = ", ".join(f"{tuple(a['input_ids'].shape)}→{tuple(b['input_ids'].shape)}"
                       for a, b in zip(variants["padded"], variants["packed"]))
    detail = (f"{ctx.args.experiment}, {len(batches)} real batches of {config.data.batch_size} pairs ({shapes}), "
              f"{tokens} tokens: padded {rate['padded']:.0f} tokens/s (padding fraction {padding['padded']:.2f}), "
              f"packed {rate['packed']:.0f} tokens/s (padding fraction {padding['packed']:.2f}); "
              f"max |loss difference| {loss_difference:.1e}")
    return [row("8", "training tokens/s: packed / padded", ratio, "≥ 1.6", ratio >= 1.6, detail, seconds=seconds,
                tokens=tokens, padding_fraction=padding, losses=losses)]


def item_ffn_export(ctx: Context) -> list[dict]:
    """10. Exported FFN cells (MatFormer): parameters and encoding throughput at I/2 and I/4 of the feed-forward width
    vs the full width I, each a plain transformers model with that intermediate_size, same depth, dim and rank."""
    module, tokenize, config = ctx.module("3d-ml+ffn")
    module.eval()
    model = EmbeddingModel(module, tokenize)
    origin = Origin(config.name, config.model.source, None, 0, None)  # the experiment's initial weights
    widths = axis_values(model.cells())["ffn"]
    exports = {width: export_cell(model, ctx.work_dir / f"ffn{width}", model.cell(ffn=width), origin, overwrite=True)
               for width in widths}
    models = {width: load_exported(result.path).to(ctx.device) for width, result in exports.items()}
    module.train()
    texts = [text for pair in ctx.pairs(ctx.args.throughput_texts // 2) for text in pair]
    encode = {width: (lambda model=model: model.encode_query(texts, batch_size=ctx.args.encode_batch_size))
              for width, model in models.items()}
    seconds = compare(encode, ctx.args.throughput_repeats, ctx.device)
    full = max(widths)
    rows = []
    for width in sorted(widths, reverse=True)[1:]:
        parameters = exports[width].parameters / exports[full].parameters
        detail = (f"{exports[width].cell.name}: {exports[width].parameters / 1e6:.1f} M parameters vs "
                  f"{exports[full].parameters / 1e6:.1f} M ({parameters:.2f}×); {len(texts)} texts, batch "
                  f"{ctx.args.encode_batch_size}: {len(texts) / seconds[width]:.0f} texts/s vs "
                  f"{len(texts) / seconds[full]:.0f} at ffn {full}")
        rows.append(row("10", f"throughput ffn {width} / ffn {full}", seconds[full] / seconds[width], None, None,
                        detail, seconds={str(key): value for key, value in seconds.items()},
                        parameters={str(key): result.parameters for key, result in exports.items()}))
    del models
    ctx.release("3d-ml+ffn")
    return rows


ITEMS = {"1": item_training_step, "2": item_mel_gather, "3": item_probe_grid, "4": item_export_throughput,
         "5": item_vs_sentence_transformers, "6": item_memory, "7": item_optimizer_state, "8": item_packing,
         "9": item_growth, "10": item_ffn_export, "11": item_gradient_cache}
