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
        out = Path(args.out) if args.out else run_dir / "export" / f"{cell.name.replace('/', '-')}-{args.mode}"
        check_out(out, args.overwrite)
        run = load_run(args.checkpoint)
        result = export_cell(run.model, out, run.model.cell(cell.name), run.origin(), args.mode, args.overwrite)
    except (ExportError, ConfigError, RunLoadError, CellError) as error:
        print(f"export error: {error}", file=sys.stderr)
        return 2
    print(f"exported cell {result.cell.name} ({result.mode}) to {result.path}")
    print(f"  parameters: {result.parameters / 1e6:.2f} M ({result.parameters:,})")
    if not args.no_check:
        texts = ["The file could not be opened.", "Die Datei konnte nicht geöffnet werden.", "Fichier introuvable"]
        exported = load_exported(result.path).encode_query(texts, convert_to_tensor=True)
        difference = (exported - run.model.encode(texts, result.cell)).abs().max().item()
        print(f"  check: max |export - training| over {len(texts)} texts = {difference:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
