"""What hard-negative mining writes besides the rows: ``sources.yaml`` and the reports (``report.json``,
``report.md``), from the per-source statistics in ``.mining/stats/``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from omegaconf import DictConfig

from contracts.atomic import write_atomic
from datamodules.mining_recipe import RULES, MiningConfig
from datamodules.sources import SIDECAR_NAME, UNKNOWN_LANGUAGE


def _finished(stats_dir: Path) -> dict[str, dict]:
    return {path.stem: json.loads(path.read_text(encoding="utf-8")) for path in sorted(stats_dir.glob("*.json"))}


def write_sidecar(out: Path, stats_dir: Path) -> None:
    """``sources.yaml`` for the sources written so far (the DataModule refuses entries without a file)."""
    import yaml

    declared = {name: {"task": "retrieval", **({"language": stats["language"]}
                                               if stats["language"] != UNKNOWN_LANGUAGE else {})}
                for name, stats in _finished(stats_dir).items() if (out / f"{name}.jsonl").is_file()}
    write_atomic(out / SIDECAR_NAME, yaml.safe_dump(declared, sort_keys=True, allow_unicode=True))


def write_report(out: Path, stats_dir: Path, config: DictConfig, mining: MiningConfig, names: list[str]) -> dict:
    """``report.json`` and ``report.md`` over this run's sources (mined now or before)."""
    finished = _finished(stats_dir)
    sources = {name: {key: value for key, value in finished[name].items() if key != "settings"}
               for name in names if name in finished}
    total = {key: sum(stats[key] for stats in sources.values())
             for key in ("queries", "rows_written", "rows_too_few_negatives", "candidates", "texts_encoded",
                         "encode_seconds", "seconds")}
    total["removed"] = {rule: sum(stats["removed"][rule] for stats in sources.values()) for rule in RULES}
    total["queries_per_s"] = total["queries"] / total["seconds"] if total["seconds"] else 0.0
    total["texts_encoded_per_s"] = total["texts_encoded"] / total["encode_seconds"] if total["encode_seconds"] else 0.0
    report = {"experiment": config.name, "out": str(out), "model": mining.model,
              "options": dataclasses.asdict(mining), "total": total, "sources": sources}
    write_atomic(out / "report.json", json.dumps(report, ensure_ascii=False, indent=1))
    write_atomic(out / "report.md", report_markdown(report))
    return report


def report_markdown(report: dict) -> str:
    """The report for a human: one table row per source, the removals, negatives per row, and a sample."""
    options = report["options"]
    recipe = ", ".join(f"{key} {options[key]}" for key in ("top_k", "skip_top", "max_score", "max_ratio", "keep",
                                                           "min_negatives", "max_queries", "max_pool"))
    lines = [f"# Hard negatives for `{report['experiment']}`", "",
             f"Model: `{report['model']}`. Recipe: {recipe}. Removed candidates count under the first rule that "
             f"removes them, in the order {', '.join(RULES)}. Seconds and throughput are the pass that mined the "
             "source: encodings it found in the cache cost it nothing.", "",
             "| source | queries | pool | candidates/query | " + " | ".join(f"{rule}/query" for rule in RULES)
             + " | rows written | too few | negatives/row | s | queries/s | texts encoded/s |",
             "|---" * (10 + len(RULES)) + "|"]
    rows = [*report["sources"].items(), ("**total**", report["total"])]
    for name, stats in rows:
        queries = max(1, stats["queries"])
        removed = " | ".join(f"{stats['removed'][rule] / queries:.1f}" for rule in RULES)
        pool = stats.get("pool", "")
        mean = f"{stats['mean_negatives_per_written_row']:.1f}" if "mean_negatives_per_written_row" in stats else ""
        lines.append(f"| {name} | {stats['queries']} | {pool} | {stats['candidates'] / queries:.1f} | {removed} | "
                     f"{stats['rows_written']} | {stats['rows_too_few_negatives']} | {mean} | {stats['seconds']:.0f} | "
                     f"{stats['queries_per_s']:.1f} | {stats['texts_encoded_per_s']:.1f} |")
    lines += ["", "## Negatives per row (before the min_negatives cut)", ""]
    lines += [f"- {name}: " + ", ".join(f"{count}: {rows}" for count, rows in stats["negatives_per_row"].items())
              for name, stats in report["sources"].items()]
    lines += ["", "## Sample", ""]
    for name, stats in report["sources"].items():
        for sample in stats["sample"]:
            lines += [f"**{name}** query: {sample['query']}", f"- positive ({sample['positive_score']:.3f}): "
                      f"{sample['positive']}"]
            lines += [f"- negative {i + 1} ({negative['score']:.3f}): {negative['text']}"
                      for i, negative in enumerate(sample["negatives"])]
            lines.append("")
    return "\n".join(lines) + "\n"
