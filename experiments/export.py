"""``python -m experiments.export CKPT [--cell NAME] [--layers l --dim d --rank r --ffn m] [--mode compat|factorized]``
(``make export CKPT=... CELL=layer_2/dim_64/rank_64``): export one cell of a run, then check it against training.

``--cell`` takes a cell name or a part of one (``layer_2/ffn_384``: the other tags from the full cell), for any
axis; ``--layers``/``--dim``/``--rank``/``--ffn`` are short names for the parts ``layer_l``, ``dim_d``, ``rank_r``,
``ffn_m``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from lightning_modules.cell_export import MODES


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.split("\n")[1])
    parser.add_argument("checkpoint", help="outputs/<NAME>/<timestamp>/checkpoints/last.ckpt")
    parser.add_argument("--cell", help="the cell's name as the probe prints it (layer_2/dim_64/rank_64/...), or a "
                                       "part of it (the other tags from the full cell)")
    parser.add_argument("--layers", type=int, help="blocks to keep (default: all)")
    parser.add_argument("--dim", type=int, help="embedding width (default: the hidden size)")
    parser.add_argument("--rank", type=int, help="token-embedding rank of a MEL run (default: the largest trained)")
    parser.add_argument("--ffn", type=int, help="feed-forward width of an FFN run (default: the largest trained)")
    parser.add_argument("--mode", default="compat", choices=MODES)
    parser.add_argument("--out", help="output folder (default: <run_dir>/export/<cell>-<mode>)")
    parser.add_argument("--overwrite", action="store_true", help="replace the files of an existing export folder")
    parser.add_argument("--no-check", action="store_true", help="skip comparing the export with the training model")
    parser.add_argument("--register", metavar="NAME", help="also register it as a new version of NAME in MLflow")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from experiments.config import ConfigError
    from experiments.loading import RunLoadError, load_run, run_cells, run_config
    from lightning_modules.embedding_model import CellError, find_cell
    from lightning_modules.cell_export import ExportError, check_out, export_cell, load_exported

    tags = {key: value for key, value in (("layer", args.layers), ("dim", args.dim), ("rank", args.rank),
                                          ("ffn", args.ffn)) if value is not None}
    try:
        run_dir, config = run_config(args.checkpoint)
        cell = find_cell(run_cells(config), args.cell, **tags)  # from the config: before seconds of weight loading
        out = Path(args.out) if args.out else default_out(run_dir, cell, args.mode)
        check_out(out, args.overwrite)
        run = load_run(args.checkpoint)
        result = export_cell(run.model, out, run.model.cell(cell.name), run.origin(), args.mode, args.overwrite)
    except (ExportError, ConfigError, RunLoadError, CellError) as error:
        print(f"export error: {error}", file=sys.stderr)
        return 2
    report(run, result, check=not args.no_check)
    if args.register:
        from experiments.registry import RegistryError

        try:
            register_export(run, result, args.register)
        except RegistryError as error:
            print(f"export error: {error}", file=sys.stderr)
            return 2
    return 0


def default_out(run_dir: Path, cell, mode: str) -> Path:
    """``<run_dir>/export/<cell name, / as ->-<mode>``: where an export goes unless ``--out`` says otherwise."""
    return run_dir / "export" / f"{cell.name.replace('/', '-')}-{mode}"


def report(run, result, check: bool = True) -> None:
    """Prints where the cell went, its parameters and (``check``) the largest difference from training."""
    from lightning_modules.cell_export import load_exported

    print(f"exported cell {result.cell.name} ({result.mode}) to {result.path}")
    print(f"  parameters: {result.parameters / 1e6:.2f} M ({result.parameters:,})")
    if check:
        texts = ["The file could not be opened.", "Die Datei konnte nicht geöffnet werden.", "Fichier introuvable"]
        exported = load_exported(result.path).encode_query(texts, convert_to_tensor=True)
        difference = (exported - run.model.encode(texts, result.cell)).abs().max().item()
        print(f"  check: max |export - training| over {len(texts)} texts = {difference:.2e}")


def register_export(run, result, name: str, scores: dict | None = None, costs: dict | None = None,
                    extra: dict | None = None):
    """Registers an exported cell as a new version of ``name`` in the run's MLflow store (see
    :mod:`experiments.registry`), tagged with its scores (default: the run's latest probe table) and costs (default:
    the analytic ones); prints and returns the version."""
    from experiments.registry import RegistryError, register, version_tags
    from experiments.mlflow_logger import RUN_ID_FILE
    from lightning_modules.costs import cell_cost

    run_id_file = run.run_dir / RUN_ID_FILE
    if not run_id_file.is_file():
        raise RegistryError(f"{run.run_dir} has no MLflow run ({RUN_ID_FILE}) to register the model from")
    if scores is None:
        from experiments.frontier import FrontierError, latest_probe_table

        try:
            table, _ = latest_probe_table(run.run_dir)
            cell = next((entry for entry in table["cells"] if entry["name"] == result.cell.name), None)
            scores = {task: values["main_score"] for task, values in (cell or {}).get("scores", {}).items()}
        except FrontierError:
            scores = {}
    if costs is None:
        costs = cell_cost(run.model.module, result.cell, run.model.tokenize.max_length, result.mode).summary()
    tags = version_tags(result.cell.name, result.mode, scores, costs, extra)
    version = register(result.path, name, run.config.tracking.uri, run_id_file.read_text().strip(), tags)
    print(f"registered {name} version {version.version} (MLflow run {version.run_id}, {run.config.tracking.uri}): "
          f"load with mlflow.sentence_transformers.load_model('models:/{name}/{version.version}')")
    return version


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
