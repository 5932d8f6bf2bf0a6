"""GPU check: training throughput, MFU and peak memory of a Qwen3-0.6B-shaped embedder under FSDP2.

    python -m bench.gpu_check              # make gpu-check; on a CUDA machine: < 8 minutes, no network, no download

On CUDA: a random-init Qwen3 with the real 0.6B shape (hidden 1024, 28 blocks, 16 heads × 128, vocab 151,936),
bf16 mixed precision, FSDP2 over every GPU present (the script re-launches itself under torchrun when there is
more than one), synthetic full-length batches. Without CUDA it runs a tiny shape on the CPU (fp32, FSDP2 over
one gloo process) so CI keeps it alive; those numbers mean nothing.

One row per setup: plain contrastive, MRL, MLL, MEL, all three, all three with the precision axis (3x the views),
all three with activation checkpointing, all three with ``adamw8bit`` (skipped when bitsandbytes is not
installed), and all three on realistic variable-length batches (log-normal lengths around a quarter of
``--seq-len``, ~55 % padding as in the quickstart's gettext batches), padded and packed (``data.packing``: one
flattened sequence per step and variable-length attention where torch has it, else a block mask), and all three
on 128 queries per GPU (256 sequences: a batch whose activations need gradient caching) cached in chunks of 32 texts
(``loss.cache_chunk_size``; its MFU does not count the extra forward). Needs only torch, lightning and transformers
(+ numpy): nothing of the project that imports omegaconf, mlflow or mteb.

Columns: tokens/s over all GPUs (median step time after warm-up); MFU = model FLOPs / (GPUs × dense bf16 peak),
model FLOPs per token = 6 · non-embedding parameters + 12 · blocks · attention width · sequence length
(activation recomputation not counted; variable-length rows count real tokens and the mean text length); peak memory = ``torch.cuda.max_memory_allocated`` on rank 0 after warm-up,
less what was allocated before the setup's model was built.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch
from tqdm import tqdm
from transformers import Qwen3Config, Qwen3Model

from contracts.batch_layout import pack, pad
from experiments.console import VERBOSE_FLAG, quiet_libraries
from lightning_modules.backbone_adapter import Backbone
from lightning_modules.distributed import FSDP2Strategy
from lightning_modules.flops import peak_flops
from lightning_modules.losses import ContrastiveLoss
from lightning_modules.module import MatryoshkaEmbedder
from lightning_modules.plugins import BUILTIN_PLUGINS

QWEN3_0_6B = dict(vocab_size=151_936, hidden_size=1024, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, intermediate_size=3072)
TINY = dict(vocab_size=2048, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128)


@dataclass
class Setup:
    name: str
    plugins: tuple[str, ...] = ()
    optimizer: str = "adamw"
    activation_checkpointing: bool = False
    lengths: str = "full"  # full (synthetic full-length batches) | variable (realistic lengths)
    packing: bool = False
    queries: int | None = None  # per GPU; None: --queries
    cache_chunk_size: int | None = None  # loss.cache_chunk_size (gradient caching)
    result: dict = field(default_factory=dict)


SETUPS = [Setup("plain contrastive"), Setup("MRL", ("mrl",)), Setup("MLL", ("mll",)), Setup("MEL", ("mel",)),
          Setup("MLL+MRL+MEL", ("mll", "mrl", "mel")),
          Setup("MLL+MRL+MEL+precision", ("mll", "mrl", "mel", "precision")),
          Setup("MLL+MRL+MEL, act. ckpt", ("mll", "mrl", "mel"), activation_checkpointing=True),
          Setup("MLL+MRL+MEL, adamw8bit", ("mll", "mrl", "mel"), optimizer="adamw8bit"),
          Setup("MLL+MRL+MEL, var. len.", ("mll", "mrl", "mel"), lengths="variable"),
          Setup("MLL+MRL+MEL, var. len., packed", ("mll", "mrl", "mel"), lengths="variable", packing=True),
          Setup("MLL+MRL+MEL, 256 seqs, cached", ("mll", "mrl", "mel"), queries=128, cache_chunk_size=32)]


class StepTimer(L.Callback):
    """Wall time of every optimizer step (device synchronised), and peak memory after warm-up."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self.tokens, self.padding, self.started = warmup, [], [], [], 0.0

    def _sync(self, module: L.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._sync(module)
        if trainer.global_step == self.warmup and module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(module.device)
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._sync(module)
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self.started)
            self.tokens.append(int(batch["attention_mask"].sum()))  # real tokens (after the timing: it syncs)
            self.padding.append(1 - self.tokens[-1] / batch["attention_mask"].numel())


def synthetic_batches(num_queries: int, seq_len: int, vocab_size: int, seed: int):
    """Endless full-length batches of random token ids: queries then passages, no padding, no hard negatives."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        ids = torch.randint(0, vocab_size, (2 * num_queries, seq_len), generator=generator)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids), "num_queries": num_queries,
               "negatives_per_query": 0}


def variable_batches(num_queries: int, seq_len: int, vocab_size: int, seed: int, packing: bool):
    """Endless batches of realistic lengths: log-normal (σ 0.6) around a quarter of ``seq_len``, clipped to
    [4, seq_len] (the padded layout is ~55 % padding, as the quickstart's gettext batches), padded or packed."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        lengths = (torch.randn(2 * num_queries, generator=generator) * 0.6 + math.log(seq_len / 4)).exp()
        sequences = [torch.randint(1, vocab_size, (length,), generator=generator).tolist()
                     for length in lengths.clamp(4, seq_len).long().tolist()]
        layout = pack(sequences, 0) if packing else pad(sequences, 0)
        yield {**layout, "num_queries": num_queries, "negatives_per_query": 0}


def run_setup(setup: Setup, args: argparse.Namespace, shape: dict, on_cuda: bool) -> None:
    L.seed_everything(0, verbose=False)
    floor = torch.cuda.memory_allocated() if on_cuda else 0  # what earlier setups still hold is not this one's
    with torch.device("cuda" if on_cuda else "cpu"):  # random init straight on the GPU: seconds, not minutes
        model = Qwen3Model(Qwen3Config(max_position_embeddings=max(512, args.seq_len), tie_word_embeddings=False,
                                       use_cache=False, **shape))  # training keeps no KV cache
    backbone = Backbone(model.train(), "decoder")
    plugins = [BUILTIN_PLUGINS[name](BUILTIN_PLUGINS[name].Config(), backbone.info, 0) for name in setup.plugins]
    optim = SimpleNamespace(name=setup.optimizer, lr=1e-5, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.01,
                            warmup_steps=2, min_lr=1e-7)
    module = MatryoshkaEmbedder(backbone, plugins, ContrastiveLoss(0.05), optim, setup.activation_checkpointing,
                                setup.cache_chunk_size)
    queries = setup.queries or args.queries
    timer = StepTimer(args.warmup)
    devices = torch.cuda.device_count() if on_cuda else 1
    trainer = L.Trainer(accelerator="cuda" if on_cuda else "cpu", devices=devices, strategy=FSDP2Strategy(),
                        precision="bf16-mixed" if on_cuda else "32-true", max_steps=args.warmup + args.steps,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer])
    batches = (synthetic_batches(queries, args.seq_len, shape["vocab_size"], 0) if setup.lengths == "full" else
               variable_batches(queries, args.seq_len, shape["vocab_size"], 0, setup.packing))
    trainer.fit(module, train_dataloaders=batches)
    step = statistics.median(timer.times)
    tokens = statistics.median(timer.tokens) * devices  # the same lengths on every device
    text_length = tokens / devices / (2 * queries)
    flops_per_token = (6 * module.dense_parameters
                       + 12 * shape["num_hidden_layers"] * shape["num_attention_heads"] * shape["head_dim"] * text_length)
    peak = peak_flops(module.device) if on_cuda else None  # the CPU fallback's numbers mean nothing
    setup.result = {
        "tokens_per_s": tokens / step, "step_s": step, "padding_fraction": statistics.median(timer.padding),
        "mfu": flops_per_token * tokens / step / (peak * devices) if peak else None,
        "peak_memory_gb": (torch.cuda.max_memory_allocated() - floor) / 2**30 if on_cuda else None,
        "world_size": devices, "device": torch.cuda.get_device_name(module.device) if on_cuda else "cpu",
    }
    del trainer, module, backbone, model
    gc.collect()  # the Trainer and the module refer to each other: free this setup's memory before the next one
    if on_cuda:
        torch.cuda.empty_cache()


def table(setups: list[Setup]) -> str:
    lines = [f"{'setup':<31} {'tokens/s':>12} {'step (s)':>9} {'MFU':>7} {'peak mem (GB)':>14} {'padding':>8}"]
    for setup in setups:
        r = setup.result
        if "skipped" in r:
            lines.append(f"{setup.name:<31} skipped: {r['skipped']}")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        memory = f"{r['peak_memory_gb']:.1f}" if r["peak_memory_gb"] is not None else "n/a"
        lines.append(f"{setup.name:<31} {r['tokens_per_s']:>12,.0f} {r['step_s']:>9.3f} {mfu:>7} {memory:>14} "
                     f"{r['padding_fraction']:>8.2f}")
    return "\n".join(lines)


def parse_args(argv: list[str], on_cuda: bool) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10 if on_cuda else 2, help="timed steps per setup")
    parser.add_argument("--warmup", type=int, default=3 if on_cuda else 1, help="untimed steps first")
    parser.add_argument("--queries", type=int, default=16 if on_cuda else 4,
                        help="queries per GPU (as many passages: 2x sequences)")
    parser.add_argument("--seq-len", type=int, default=512 if on_cuda else 32)
    parser.add_argument("--only", nargs="*", help="run only these setups (names as in the table)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(VERBOSE_FLAG, action="store_true",
                        help="also what the libraries print about themselves (device lines, tips, known warnings)")
    return parser.parse_args(argv)


def not_measured(setups: list[Setup], on_cuda: bool) -> list[str]:
    """What the table could not measure, one line each."""
    if not on_cuda:
        return ["MFU and peak memory: no CUDA device (a tiny shape on the CPU: its numbers only show the check runs)"]
    unknown = sorted({s.result["device"] for s in setups if "device" in s.result and s.result["mfu"] is None})
    return [f"MFU: no dense bf16 peak known for {device} (PEAK_BF16 in lightning_modules/flops.py)"
            for device in unknown]


def main(argv: list[str]) -> int:
    on_cuda = torch.cuda.is_available()
    args = parse_args(argv, on_cuda)
    if not args.verbose:
        quiet_libraries()
    if on_cuda and torch.cuda.device_count() > 1 and "LOCAL_RANK" not in os.environ:
        # FSDP2 over every GPU: one process per GPU, all running this same script (torchrun sets the ranks).
        os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  f"--nproc-per-node={torch.cuda.device_count()}", "-m", "bench.gpu_check", *argv])
    if on_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))  # before any model is built on "cuda"
    shape = QWEN3_0_6B if on_cuda else TINY
    setups = [setup for setup in SETUPS if not args.only or setup.name in args.only]
    rank_zero = int(os.environ.get("RANK", 0)) == 0
    with tqdm(setups, desc="gpu-check", unit="setup", file=sys.stderr, disable=not rank_zero) as bar:
        for setup in bar:
            bar.set_postfix_str(setup.name)
            if setup.optimizer != "adamw" and importlib.util.find_spec("bitsandbytes") is None:
                setup.result = {"skipped": "bitsandbytes is not installed"}
                continue
            started = time.perf_counter()
            run_setup(setup, args, shape, on_cuda)
            setup.result["setup_s"] = time.perf_counter() - started
    if rank_zero:
        device = next((s.result["device"] for s in setups if "device" in s.result), "cpu")
        world = next((s.result["world_size"] for s in setups if "world_size" in s.result), 1)
        print(f"\nGPU check on {world} x {device}: hidden {shape['hidden_size']}, {shape['num_hidden_layers']} blocks, "
              f"vocab {shape['vocab_size']:,}; {2 * args.queries} sequences x {args.seq_len} tokens per device; "
              f"{'bf16-mixed' if on_cuda else 'fp32 (CPU fallback: tiny shape)'}, FSDP2\n" + table(setups))
        for line in not_measured(setups, on_cuda):
            print(f"not measured: {line}")
        if args.json:
            args.json.write_text(json.dumps({s.name: s.result for s in setups}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
