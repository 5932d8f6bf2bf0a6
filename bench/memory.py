"""``python -m bench.memory --variant mll+mrl|3d-ml ...``: peak memory of training steps of one variant, in a process
of its own (started by ``make bench`` item 6), printed as one JSON line.

CPU: the process's peak resident set (``VmHWM``), reset after the model is built so it covers the steps only (it
still counts the weights, which stay resident). CUDA: ``torch.cuda.max_memory_allocated`` over the steps.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from bench.common import build_module, compose_variant, to_device, trainable, translation_texts, weighted_loss
from bench.context import VARIANTS


def resident_peak_bytes() -> int:
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) * 1024


def reset_resident_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: resets VmHWM to the current resident size


def step_process_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every one-step measuring child process takes (this module's and gradient caching's)."""
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--corpus", default="data/gettext")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def start_step_process(args: argparse.Namespace) -> torch.device:
    """Offline hub, the thread count and the device of a measuring child process."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    return torch.device(args.device)


def main() -> None:
    parser = step_process_arguments(argparse.ArgumentParser())
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    device = start_step_process(args)
    config = compose_variant(args.experiment, [*VARIANTS[args.variant], f"model.max_length={args.max_length}"])
    module, tokenize = build_module(config, device)
    pairs = translation_texts(args.corpus, args.batch_size)
    batch = to_device(tokenize([xx for xx, _ in pairs], [en for _, en in pairs]), device)
    optimizer = torch.optim.AdamW(trainable(module), lr=1e-5)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        reset_resident_peak()
    for step in range(args.steps):  # the optimizer's state is created in the first step: it counts
        optimizer.zero_grad(set_to_none=True)
        weighted_loss(module, batch, step).backward()
        optimizer.step()
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else resident_peak_bytes()
    embedding = module.backbone.input_embeddings()
    print(json.dumps({
        "variant": args.variant,
        "peak_bytes": peak,
        "peak_kind": "CUDA allocated" if device.type == "cuda" else "resident set (VmHWM)",
        "parameters": sum(p.numel() for p in module.parameters()),
        "trainable": sum(p.numel() for p in trainable(module)),
        "embedding": sum(p.numel() for p in embedding.parameters()),
        "optimizer_state_elements": sum(value.numel() for state in optimizer.state.values()
                                        for value in state.values() if torch.is_tensor(value) and value.dim() > 0),
    }))


if __name__ == "__main__":
    main()
