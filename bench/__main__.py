"""``python -m bench [--items 1,2,...] [sizes]``: runs the benchmark items, prints the ratio table (markdown) and
writes it with the machine description and raw timings as JSON (default ``bench/results/latest.json``)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="1,2,3,4,5,6,7,8,9,10,11", help="comma-separated item numbers")
    parser.add_argument("--out", default="bench/results/latest.json")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--corpus", default="data/gettext", help="gettext corpus folder (built if missing)")
    group = parser.add_argument_group("model items (1, 3, 4, 5, 6, 7, 8, 9, 10)")
    group.add_argument("--experiment", default="quickstart", help="experiment whose model is measured")
    group.add_argument("--batch-size", type=int, default=32, help="training pairs per step")
    group.add_argument("--max-length", type=int, default=64)
    group.add_argument("--steps", type=int, default=3, help="measured steps per variant (items 1, 5, 8, 9)")
    group.add_argument("--packing-batches", type=int, default=3, help="real training batches per step (item 8)")
    group.add_argument("--growth-probe-locales", nargs="+", default=["de", "kk", "ta"],
                       help="probe locales of the probe-vs-cells series (item 9)")
    group.add_argument("--encode-batch-size", type=int, default=32)
    group.add_argument("--probe-texts", type=int, default=64, help="texts encoded for every cell (item 3)")
    group.add_argument("--throughput-texts", type=int, default=256, help="texts encoded per repeat (items 4, 10)")
    group.add_argument("--throughput-repeats", type=int, default=3)
    group.add_argument("--export-layers", type=int, nargs="+", default=[1, 2], help="shallow depths (item 4)")
    group = parser.add_argument_group("MEL item (2)")
    group.add_argument("--mel-vocab", type=int, default=151_936)
    group.add_argument("--mel-rank", type=int, default=512)
    group.add_argument("--mel-dim", type=int, default=1024)
    group.add_argument("--mel-tokens", type=int, default=4096)
    group.add_argument("--mel-repeats", type=int, default=3)
    return parser.parse_args(argv)


def markdown(rows: list[dict]) -> str:
    lines = ["| # | ratio | value | goal | met | measured |", "|---|---|---|---|---|---|"]
    for row in rows:
        met = {True: "yes", False: "**no**", None: "–"}[row["met"]]
        lines.append(f"| {row['item']} | {row['name']} | {row['ratio']:.2f} | {row['goal'] or '–'} | {met} | "
                     f"{row['detail']} |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from bench.common import machine
    from bench.items import ITEMS, Context

    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    items = [item.strip() for item in args.items.split(",") if item.strip()]
    unknown = [item for item in items if item not in ITEMS]
    if unknown:
        print(f"unknown item(s) {unknown}; choose from {', '.join(ITEMS)}", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    load_before = os.getloadavg()[0]  # other processes on the machine slow both sides of a ratio, not equally
    started = time.perf_counter()
    rows, seconds = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-") as work_dir:
        context = Context(args, device, Path(work_dir))
        for item in items:
            item_started = time.perf_counter()
            print(f"[bench] item {item}: {ITEMS[item].__doc__.splitlines()[0]}", file=sys.stderr, flush=True)
            rows += ITEMS[item](context)
            seconds[item] = round(time.perf_counter() - item_started, 1)
            print(f"[bench] item {item} done in {seconds[item]:.0f} s", file=sys.stderr, flush=True)
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(device),
        "arguments": vars(args),
        "seconds_per_item": seconds,
        "total_seconds": round(time.perf_counter() - started, 1),
        "load_average_1min": {"start": load_before, "end": os.getloadavg()[0]},
        "rows": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    described = report["machine"]
    print(markdown(rows))
    print(f"\nmachine: {described['cpu']}, {described['cores']} cores, {described['torch_threads']} torch threads, "
          f"{described['memory_gib']} GiB, device {described['device']}; torch {described['torch']}, "
          f"transformers {described['transformers']}, sentence-transformers {described['sentence_transformers']}; "
          f"load average {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end")
    print(f"total {report['total_seconds']:.0f} s; written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
