"""Bench item 11: gradient caching (``loss.cache_chunk_size``) and MFU.

- Peak memory and time of a 3D-ML training step at a batch of 256 pairs (512 texts), cached in chunks of 32 texts vs
  uncached: memory each side in a process of its own (``python -m bench.gradient_caching --chunk-size N``, peak as
  :mod:`bench.memory` measures it), time interleaved in this process.
- MFU (model FLOPs of the step, :meth:`~lightning_modules.module.MatryoshkaEmbedder.training_flops`, per second over
  :func:`~lightning_modules.flops.peak_flops`) of plain, 3D-ML, packed and cached steps, side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from bench.common import build_module, compare, compose_variant, to_device, trainable, translation_texts
from bench.context import Context, packed, row
from lightning_modules.flops import peak_flops
from lightning_modules.gradient_cache import GradientCache

CACHE_BATCH = 256  # pairs: 512 texts
CACHE_CHUNK = 32  # texts per chunk
MEMORY_GOAL, TIME_GOAL = 0.35, 1.4


def training_step(module, batch: dict, optimizer, chunk_size: int | None):
    """One optimizer step on ``batch`` (MEL's rank drawn for step 0 every time: both sides do the same work),
    cached in chunks of ``chunk_size`` texts or uncached (None)."""
    cache = GradientCache(chunk_size) if chunk_size else None

    def run() -> None:
        optimizer.zero_grad(set_to_none=True)
        if cache is None:
            views = module.views(batch, 0)
            module.weighted_total(views, module.view_losses(views, batch)).backward()
        else:
            cache.step(module, batch, 0)[2].backward()
        optimizer.step()
    return run


def item_gradient_cache(ctx: Context) -> list[dict]:
    """11. Gradient caching: peak memory and step time at batch 256, chunks of 32 texts, vs uncached; MFU table."""
    args = ctx.args
    module, tokenize, _ = ctx.module("3d-ml")
    plain, plain_tokenize, _ = ctx.module("plain")
    pairs = ctx.pairs(CACHE_BATCH)
    large = to_device(tokenize([xx for xx, _ in pairs], [en for _, en in pairs]), ctx.device)
    small_padded = ctx.batch(_padded(tokenize))
    small_packed = to_device(packed(small_padded, tokenize.pad_id), ctx.device)
    optimizer = torch.optim.AdamW(trainable(module), lr=1e-5)
    plain_optimizer = torch.optim.AdamW(trainable(plain), lr=1e-5)
    steps = {  # name: (step, batch, module)
        "plain": (training_step(plain, ctx.batch(_padded(plain_tokenize)), plain_optimizer, None),
                  small_padded, plain),
        "3D-ML": (training_step(module, small_padded, optimizer, None), small_padded, module),
        "3D-ML packed": (training_step(module, small_packed, optimizer, None), small_packed, module),
        f"3D-ML packed, batch {CACHE_BATCH}": (training_step(module, large, optimizer, None), large, module),
        f"3D-ML packed, batch {CACHE_BATCH}, cached {CACHE_CHUNK}":
            (training_step(module, large, optimizer, CACHE_CHUNK), large, module),
    }
    # One timed step each after one untimed (batch 256 steps take minutes on 2 shared CPU cores).
    seconds = compare({name: step for name, (step, _, _) in steps.items()}, repeats=1, device=ctx.device)
    peak = peak_flops(ctx.device)
    mfu = {name: model.training_flops(batch) / seconds[name] / peak for name, (_, batch, model) in steps.items()}
    ctx.release("plain")
    memory = {chunk: peak_memory(args, chunk) for chunk in (None, CACHE_CHUNK)}
    uncached, cached = f"3D-ML packed, batch {CACHE_BATCH}", f"3D-ML packed, batch {CACHE_BATCH}, cached {CACHE_CHUNK}"
    time_ratio = seconds[cached] / seconds[uncached]
    memory_ratio = memory[CACHE_CHUNK]["peak_bytes"] / memory[None]["peak_bytes"]
    step_memory_ratio = memory[CACHE_CHUNK]["step_bytes"] / memory[None]["step_bytes"]
    mib = 2**20
    kind = memory[None]["peak_kind"]
    setting = (f"{args.experiment} 3D-ML model, {CACHE_BATCH} pairs ({large['input_ids'].shape[0]} packed rows of "
               f"{large['input_ids'].shape[1]} tokens), chunks of {CACHE_CHUNK} texts")
    memory_detail = (f"{setting}; peak {kind} of one optimizer step: cached {memory[CACHE_CHUNK]['peak_bytes'] / mib:.0f}"
                     f" MiB vs {memory[None]['peak_bytes'] / mib:.0f} MiB; above the resident model and optimizer "
                     f"state: {memory[CACHE_CHUNK]['step_bytes'] / mib:.0f} vs {memory[None]['step_bytes'] / mib:.0f} "
                     f"MiB ({step_memory_ratio:.2f}x)")
    time_detail = f"{setting}; s/step cached {seconds[cached]:.2f} vs {seconds[uncached]:.2f}"
    peak_name = f"{peak / 1e9:.0f} GFLOP/s {'measured fp32 matmul' if ctx.device.type == 'cpu' else 'spec bf16'}"
    mfu_detail = (f"peak {peak_name}; batch {args.batch_size} pairs unless said: "
                  + ", ".join(f"{name} {100 * value:.1f} % ({seconds[name]:.2f} s)" for name, value in mfu.items()))
    return [row("11", "peak memory: cached step / uncached (batch 256, chunk 32)", memory_ratio, f"≤ {MEMORY_GOAL}",
                memory_ratio <= MEMORY_GOAL, memory_detail, memory=memory, step_memory_ratio=step_memory_ratio),
            row("11b", "step time: cached / uncached (batch 256, chunk 32)", time_ratio, f"≤ {TIME_GOAL}",
                time_ratio <= TIME_GOAL, time_detail, seconds=seconds),
            row("11c", "MFU: cached step / uncached (batch 256)", mfu[cached] / mfu[uncached], None, None, mfu_detail,
                mfu=mfu, peak_flops=peak)]


def _padded(tokenize):
    """The experiment's tokenizer laying batches out padded (it took ``data.packing`` when the model was built)."""
    import copy

    padded = copy.copy(tokenize)
    padded.packing = False
    return padded


def peak_memory(args: argparse.Namespace, chunk_size: int | None) -> dict:
    """:func:`main` in a process of its own: one peak cannot hide the other."""
    command = [sys.executable, "-m", "bench.gradient_caching", "--experiment", args.experiment,
               "--chunk-size", str(chunk_size or 0), "--max-length", str(args.max_length), "--device", args.device,
               "--corpus", args.corpus, "--threads", str(torch.get_num_threads())]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        raise RuntimeError(f"bench.gradient_caching --chunk-size {chunk_size} failed:\n{completed.stderr[-2000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    """Peak memory of one 3D-ML optimizer step at batch 256, cached (``--chunk-size N``) or not (0), as one JSON line:
    the peak (CPU: resident set, VmHWM; CUDA: allocated) and the part above what was resident before the step."""
    from bench.memory import reset_resident_peak, resident_peak_bytes

    parser = argparse.ArgumentParser()
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--chunk-size", type=int, default=0, help="texts per chunk; 0: uncached")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--corpus", default="data/gettext")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    config = compose_variant(args.experiment, [f"model.max_length={args.max_length}"])
    module, tokenize = build_module(config, device)
    pairs = translation_texts(args.corpus, CACHE_BATCH)
    batch = to_device(tokenize([xx for xx, _ in pairs], [en for _, en in pairs]), device)
    optimizer = torch.optim.AdamW(trainable(module), lr=1e-5)
    for parameter in trainable(module):  # the optimizer state exists before the step, as in every step but the first
        state = optimizer.state[parameter]
        state["step"] = torch.tensor(0.0)
        state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(parameter), torch.zeros_like(parameter)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        reset_resident_peak()
        before = resident_peak_bytes()
    training_step(module, batch, optimizer, args.chunk_size or None)()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_peak_bytes()
    print(json.dumps({"chunk_size": args.chunk_size, "peak_bytes": peak, "step_bytes": peak - before,
                      "peak_kind": "CUDA allocated" if device.type == "cuda" else "resident set (VmHWM)"}))


if __name__ == "__main__":
    main()
