"""Docs as tests: every ```bash block of README.md and docs/*.md runs, in the order written, in a temporary copy of
the working tree, at tiny size; a failing command fails the test naming its file, line and command.

The rules (docs/contributing.md#commands-in-the-docs-are-tests):

- Each line of a block is one command (``\\`` continues it; ``#`` lines are comments). A command with a
  ``<placeholder>`` other than ``<timestamp>`` / ``<ts>`` is a synopsis and is not run; ``<timestamp>`` and ``<ts>``
  become the newest folder at that place, ``KEY=...`` the value of ``KEY=`` in the file's previous command.
- ``make exp``, ``make ablation``, ``make mine`` and ``make probe`` get :data:`SHRINK` appended to their ``ARGS``
  (a random-init BERT of e5-small's width instead of the real backbone, 2 steps, one small probe; mining keeps the
  real backbone with few queries and a small pool);
  ``make`` gets ``-o .venv/.installed`` (the copy shares the venv: nothing is reinstalled into it).
- An HTML comment on the line above a block marks it: ``<!-- docs-test: skip (reason) -->`` is not run (a GPU, apt,
  a cluster, hours), ``<!-- docs-test: slow (reason) -->`` runs only in the slow test. Quoted command beginnings
  limit a clause to those commands: ``<!-- docs-test: skip "make ui" (a server); slow "make ablation" -->``.
- The fast test runs README.md's blocks; the slow one README.md's and then every docs/*.md page's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from experiments.run_metadata import PROJECT_ROOT

ROOT = Path(PROJECT_ROOT)
TINY_MODEL = "model.source=tiny_bert model.tiny.hidden_size=384 model.tiny.num_heads=4 model.max_length=48"
SMALL_PROBE = "probe.locales=[de] probe.max_pairs_per_locale=8 probe.final.enabled=false"  # final: the same small sets
TRAIN = f"{TINY_MODEL} trainer.max_steps=2 probe.at_start=false {SMALL_PROBE}"  # one probe, at the end
SHRINK = {
    "exp": TRAIN,
    "ablation": TRAIN,
    # the documented backbone: a random-init one finds no negatives below mine.max_score (all texts look alike)
    "mine": "mine.max_queries=64 mine.max_pool=256",  # 64: the folder corpus it makes has a batch (32) per source
    "probe": SMALL_PROBE,
}
# Documented commands that fail today for a reason another change fixes: (file, command as written) -> why. An
# entry whose command passes, or that names no command, fails the test: remove it.
KNOWN_FAILURES: dict[tuple[str, str], str] = {}
MARKER = re.compile(r"<!--\s*docs-test:(?P<clauses>.*?)-->")
CLAUSE = re.compile(r'(?P<kind>skip|slow)(?P<prefixes>(?:\s*"[^"]*")*)\s*(?:\((?P<reason>[^)]*)\))?')
PLACEHOLDER = re.compile(r"<(?!timestamp>|ts>)[^<>\s][^<>]*>")
NEWEST = re.compile(r"(?P<parent>[\w./-]*)/<(?:timestamp|ts)>")
TIMEOUT_S = 900


@dataclass
class Command:
    file: str
    line: int
    text: str  # as written, continuation lines joined
    skip: str | None = None  # why it is not run
    slow: bool = False

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def doc_commands(path: Path, root: Path = ROOT) -> list[Command]:
    """The commands of ``path``'s ```bash blocks in order, with their markers applied."""
    commands, clauses, block, pending = [], [], None, None
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, start=1):
        if block is None:
            if line.startswith("```bash"):
                block, marker = [], MARKER.search(lines[number - 2]) if number > 1 else None
                clauses = [m.groupdict() for m in CLAUSE.finditer(marker["clauses"])] if marker else []
            continue
        if line.startswith("```"):
            block = None
            continue
        text = line.strip()
        if pending is not None:
            pending.text = f"{pending.text} {text.removesuffix(chr(92)).strip()}"
        elif text and not text.startswith("#"):
            pending = Command(str(path.relative_to(root)), number, text.removesuffix("\\").strip())
        if pending is not None and not text.endswith("\\"):
            _apply(pending, clauses)
            commands.append(pending)
            pending = None
    return commands


def _apply(command: Command, clauses: list[dict]) -> None:
    for clause in clauses:
        prefixes = re.findall(r'"([^"]*)"', clause["prefixes"] or "")
        if prefixes and not command.text.startswith(tuple(prefixes)):
            continue
        if clause["kind"] == "skip":
            command.skip = clause["reason"] or "marked skip"
        else:
            command.slow = True
    if command.skip is None and PLACEHOLDER.search(command.text.split("#")[0]):
        command.skip = "a synopsis (placeholders)"


def runnable(command: Command, tree: Path, previous: dict[str, str]) -> str:
    """``command`` as it runs in ``tree``: placeholders resolved, ``-o .venv/.installed`` and :data:`SHRINK`."""
    tokens = shlex.split(command.text, comments=True)
    for index, token in enumerate(tokens):
        key, _, value = token.partition("=")
        if value == "..." and key in previous:
            tokens[index] = f"{key}={previous[key]}"
        tokens[index] = NEWEST.sub(lambda match: _newest(tree, match["parent"]), tokens[index])
    previous.update(token.split("=", 1) for token in tokens if re.match(r"^[A-Z]+=", token))
    if tokens[:1] == ["make"] and len(tokens) > 1:
        target = tokens[1]
        tokens.insert(1, "-o")
        tokens.insert(2, ".venv/.installed")
        if target in SHRINK:
            args = [i for i, token in enumerate(tokens) if token.startswith("ARGS=")]
            if args:
                tokens[args[-1]] = f"{tokens[args[-1]]} {SHRINK[target]}"
            else:
                tokens.append(f"ARGS={SHRINK[target]}")
    return shlex.join(tokens)


def _newest(tree: Path, parent: str) -> str:
    folder = tree / parent
    runs = sorted(entry.name for entry in folder.iterdir() if entry.is_dir()) if folder.is_dir() else []
    return f"{parent}/{runs[-1]}" if runs else f"{parent}/<no run in {parent}>"


def copy_tree(destination: Path) -> Path:
    """The working tree's files (tracked and untracked, not ignored) copied with their times; ``.venv`` linked;
    ``data/`` a new folder whose entries link to the real ones (what a command adds stays in the copy)."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file() and not source.is_symlink() and name not in (".venv", "data"):
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)
    (destination / ".venv").symlink_to((ROOT / ".venv").resolve())
    (destination / "data").mkdir()
    for entry in (ROOT / "data").iterdir() if (ROOT / "data").is_dir() else []:
        (destination / "data" / entry.name).symlink_to(entry.resolve())
    return destination


def run_docs(pages: list[Path], tree: Path, include_slow: bool) -> tuple[list[str], list[str]]:
    """``(failures, skipped)``: each failure names the file, line, command and the tail of its output."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    failures, skipped, known = [], [], dict(KNOWN_FAILURES)
    for page in pages:
        previous: dict[str, str] = {}
        for command in doc_commands(page):
            if command.skip or (command.slow and not include_slow):
                skipped.append(f"{command.where} ({command.skip or 'slow'}): {command.text}")
                continue
            ran = runnable(command, tree, previous)
            done = subprocess.run(["bash", "-c", ran], cwd=tree, env=environment, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, timeout=TIMEOUT_S)
            why = known.pop((command.file, command.text), None)
            if done.returncode and why is None:
                tail = "\n".join(done.stdout.replace("\r", "\n").splitlines()[-15:])
                failures.append(f"{command.where}: `{command.text}` exited {done.returncode}\n  ran: {ran}\n{tail}")
            elif why is not None and done.returncode == 0:
                failures.append(f"{command.where}: `{command.text}` passes now ({why}): remove it from KNOWN_FAILURES")
    failures += [f"{file}: KNOWN_FAILURES names a command it does not run: {text}" for file, text in known
                 if any(page.relative_to(ROOT).as_posix() == file for page in pages)]
    return failures, skipped


def test_readme_commands_run_as_written(tmp_path):
    failures, skipped = run_docs([ROOT / "README.md"], copy_tree(tmp_path), include_slow=False)
    assert not failures, "\n\n".join(failures)
    assert len(skipped) < len(doc_commands(ROOT / "README.md"))


@pytest.mark.slow
def test_every_docs_command_runs_as_written(tmp_path):
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    failures, _ = run_docs(pages, copy_tree(tmp_path), include_slow=True)
    assert not failures, "\n\n".join(failures)


def test_blocks_markers_placeholders_and_shrinking(tmp_path):
    page = tmp_path / "page.md"
    page.write_text('text\n<!-- docs-test: skip "make ui" (a server); slow "make ablation" -->\n```bash\n'
                    'make exp NAME=quickstart   # a comment\nmake ablation SUITE=smoke\nmake ui\n'
                    'make export CKPT=outputs/q/<timestamp>/last.ckpt \\\n  CELL=layer_2\nmake export CKPT=... DIM=8\n'
                    'make exp NAME=<experiment> [ARGS="key=value ..."]\n```\n\n<!-- docs-test: skip (gpu) -->\n'
                    '```bash\nmake exp NAME=big\n```\n```python\nprint()\n```\n')
    commands = doc_commands(page, tmp_path)
    assert [(c.line, c.skip, c.slow) for c in commands] == [
        (4, None, False), (5, None, True), (6, "a server", False), (7, None, False), (9, None, False),
        (10, "a synopsis (placeholders)", False), (15, "gpu", False)]
    assert commands[3].text == "make export CKPT=outputs/q/<timestamp>/last.ckpt CELL=layer_2"
    for stamp in ("20260101-000000", "20260102-000000"):
        (tmp_path / "outputs" / "q" / stamp).mkdir(parents=True)
    previous: dict[str, str] = {}
    assert runnable(commands[0], tmp_path, previous) == (
        f"make -o .venv/.installed exp NAME=quickstart 'ARGS={SHRINK['exp']}'")
    assert runnable(commands[3], tmp_path, previous) == (
        "make -o .venv/.installed export CKPT=outputs/q/20260102-000000/last.ckpt CELL=layer_2")
    assert runnable(commands[4], tmp_path, previous) == (
        "make -o .venv/.installed export CKPT=outputs/q/20260102-000000/last.ckpt DIM=8")
    with_args = Command("x.md", 1, 'make probe CKPT=a ARGS="probe.locales=[de,kk]"')
    assert runnable(with_args, tmp_path, {}).endswith(f"'ARGS=probe.locales=[de,kk] {SHRINK['probe']}'")
