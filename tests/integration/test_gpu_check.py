"""``python -m bench.gpu_check`` stays alive on CPU (tiny shape), importing only what a bare GPU machine has."""

import json
import subprocess
import sys

from tests.distributed import ROOT

# Packages the lent GPU machines lack: importing any of them must not be needed.
ABSENT = ("omegaconf", "mlflow", "mteb", "sentence_transformers")
RUNNER = ("import runpy, sys\n"
          "for name in sys.argv[1].split(','): sys.modules[name] = None  # import raises ImportError\n"
          "sys.argv = ['gpu_check.py', *sys.argv[2:]]\n"
          "runpy.run_module('bench.gpu_check', run_name='__main__', alter_sys=True)\n")


def test_gpu_check_runs_every_setup_on_cpu_without_project_only_packages(tmp_path):
    out = tmp_path / "gpu_check.json"
    result = subprocess.run([sys.executable, "-c", RUNNER, ",".join(ABSENT), "--steps", "1", "--warmup", "0",
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert list(rows) == ["plain contrastive", "MRL", "MLL", "MEL", "MLL+MRL+MEL", "MLL+MRL+MEL+precision",
                          "MLL+MRL+MEL, act. ckpt", "MLL+MRL+MEL, adamw8bit", "MLL+MRL+MEL, var. len.",
                          "MLL+MRL+MEL, var. len., packed", "MLL+MRL+MEL, 256 seqs, cached"]
    for name, row in rows.items():
        assert row["tokens_per_s"] > 0 and row["device"] == "cpu" and row["mfu"] is None, name
    assert "GPU check on 1 x cpu" in result.stdout and "MLL+MRL+MEL, adamw8bit" in result.stdout
    # Its progress bar, the title, the table and what it could not measure; no library's notices (tips, device
    # lines, deprecations, bitsandbytes' kernel note).
    printed = [line for line in (result.stdout + result.stderr).replace("\r", "\n").splitlines()
               if line.strip() and not line.startswith("gpu-check:")]
    assert len(printed) == 1 + 1 + len(rows) + 1, printed
    assert printed[-1].startswith("not measured: MFU and peak memory: no CUDA device"), printed
    variable, packed = rows["MLL+MRL+MEL, var. len."], rows["MLL+MRL+MEL, var. len., packed"]
    assert rows["MLL+MRL+MEL"]["padding_fraction"] == 0 and packed["padding_fraction"] < variable["padding_fraction"]
