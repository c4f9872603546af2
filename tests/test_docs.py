"""The commands, imports and links of README.md and docs/*.md hold as written.

Every shell command of a ``bash`` block is read (continuation lines joined, comments dropped): the
Hydra commands' overrides must compose with the command's own config (a key, group or option that
does not exist fails), scripts and their ``--flags`` must exist, ``make`` targets must be in the
Makefile; the cheap commands (``--help``, the manifest checker, ``lorkd-labels``) are run as written,
in a folder where the demo's paths hold the tests' tiny data and checkpoints. Every ``from X import Y``
of a ``python`` block imports, and every relative link names a file (and heading) that exists.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import compose_config

from lorkd.utils import PROJECT_ROOT

PAGES = [PROJECT_ROOT / "README.md", *sorted((PROJECT_ROOT / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent

# the Hydra app behind each way of starting it: first word(s) -> config name
APPS = {
    "train.py": "train", "eval.py": "eval", "predict.py": "predict", "lorkd-train": "train",
    "lorkd-eval": "eval", "lorkd-predict": "predict", "lorkd-export": "export", "lorkd-labels": "labels",
    "lorkd-data": "data_import",
    "lorkd.commands.check_manifest": "check_manifest", "lorkd.commands.labels": "labels",
    "scripts/convert_lorkd_official.py": "convert", "scripts/export_experts.py": "export",
    "scripts/slurm/train.sbatch": "train", "scripts/slurm/eval.sbatch": "eval",
}  # fmt: skip
INSTALL = (".venv/bin/pip", "python3 -m venv")


def blocks(page: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", page.read_text(encoding="utf-8"), flags=re.M | re.S)


def commands() -> list[tuple[str, str]]:
    """(page, command) for every command of every bash block, continuation lines joined, comments dropped."""
    found = []
    for page in PAGES:
        for block in blocks(page, "bash"):
            for command in re.sub(r"\\\n\s*", " ", block).splitlines():
                command = re.sub(r"\s+#.*$", "", command).strip()
                if command and not command.startswith("#"):
                    found.append((page.name, command))
    return found


def app_and_arguments(command: str) -> tuple[str, list[str]] | None:
    """The config name and the overrides of a command that starts a Hydra app (None for other commands)."""
    words = shlex.split(command)
    for i, word in enumerate(words):
        if word == "lorkd-data":  # `lorkd-data import DIR key=value...`: the overrides its entry point makes of it
            from lorkd.cli import _data_arguments

            return APPS[word], _data_arguments(words[i + 1 :])
        if word in APPS:
            return APPS[word], words[i + 1 :]
    return None


def test_the_pages_hold_commands_of_every_kind():
    apps = {app for _, command in commands() if (found := app_and_arguments(command)) for app in [found[0]]}
    assert apps == set(APPS.values())  # every app is documented, and every documented command was recognised


@pytest.mark.parametrize("page, command", commands())
def test_every_command_names_what_exists(page, command):
    if command.startswith(INSTALL):
        return
    words = shlex.split(command)
    if words[0] == "make":
        assert re.search(rf"^{words[1]}:", (PROJECT_ROOT / "Makefile").read_text(), flags=re.M), command
        return
    found = app_and_arguments(command)
    if found is None:  # an argparse script: it exists and knows every --flag given
        script = next(w for w in words if w.endswith(".py"))
        assert (PROJECT_ROOT / script).is_file(), f"{page}: {script} does not exist"
        flags = [w.split("=")[0] for w in words if w.startswith("--")]
        if flags:
            env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
            help_text = subprocess.run(
                [sys.executable, script, "--help"], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True
            ).stdout
            for flag in flags:
                assert flag in help_text, f"{page}: {script} has no option {flag}"
        return
    name, arguments = found
    overrides = [a for a in arguments if not a.startswith("--")]
    assert all("=" in a or a.startswith("~") for a in overrides), f"{page}: not key=value: {command}"
    compose_config(name, overrides)  # an unknown key, group or option raises here


def run(command: str, cwd: Path) -> subprocess.CompletedProcess:
    words = shlex.split(command)
    if words[0] == "python":
        words[0] = sys.executable
    elif (BIN / words[0]).is_file():
        words[0] = str(BIN / words[0])
    return subprocess.run(words, cwd=cwd, capture_output=True, text=True, timeout=300)


def documented(*starts: str) -> list[str]:
    return sorted({command for _, command in commands() if command.startswith(starts)})


def demo_folder(tmp_path: Path, data: Path, lorkd: Path | None = None, export: Path | None = None) -> Path:
    """A working folder where the demo's documented paths lead to the tests' tiny data and models."""
    (tmp_path / "outputs" / "demo").mkdir(parents=True)
    (tmp_path / "outputs" / "demo" / "data").symlink_to(data)
    if lorkd is not None:
        (tmp_path / "outputs" / "demo" / "lorkd" / "checkpoints").mkdir(parents=True)
        (tmp_path / "outputs" / "demo" / "lorkd" / "checkpoints" / "last.ckpt").symlink_to(lorkd)
    if export is not None:
        (tmp_path / "exports").mkdir()
        (tmp_path / "exports" / "demo").symlink_to(export)
    return tmp_path


def test_help_and_the_manifest_checker_run_as_written(tmp_path, tiny_demo_data):
    helps = [c for c in documented("python ", "lorkd-") if c.endswith("--help")]
    checks = documented("python -m lorkd.commands.check_manifest")
    assert helps and checks
    for command in helps:
        done = run(command, PROJECT_ROOT)
        assert done.returncode == 0 and "== Configuration groups ==" in done.stdout, f"{command}\n{done.stderr[-2000:]}"
    folder = demo_folder(tmp_path, tiny_demo_data)
    for command in checks:
        done = run(command, folder)
        assert done.returncode == 0 and ": OK" in done.stdout, f"{command}\n{done.stdout}{done.stderr[-2000:]}"


@pytest.mark.slow
def test_lorkd_labels_runs_as_written(tmp_path, tiny_demo_data, tiny_lorkd_ckpt, tiny_export):
    folder = demo_folder(tmp_path, tiny_demo_data, tiny_lorkd_ckpt, tiny_export)
    commands_ = documented("lorkd-labels", "python -m lorkd.commands.labels")
    assert len(commands_) >= 2
    for command in commands_:
        done = run(command, folder)
        assert done.returncode == 0 and "liver" in done.stdout, f"{command}\n{done.stderr[-2000:]}"


def test_every_import_of_a_python_block_imports():
    imports = {
        line.strip()
        for page in PAGES
        for block in blocks(page, "python")
        for line in block.splitlines()
        if re.match(r"\s*(from \S+ import|import) ", line)
    }
    assert imports
    done = subprocess.run([sys.executable, "-c", "\n".join(sorted(imports))], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors of a page (lower case, punctuation dropped, spaces to hyphens) and its <a id>s."""
    text = page.read_text(encoding="utf-8")
    headings = re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S), flags=re.M)
    slugs = {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}
    return slugs | set(re.findall(r'<a id="([^"]+)"></a>', text))


def test_every_relative_link_leads_to_a_file_and_heading():
    pages = [*PAGES, PROJECT_ROOT / "scripts" / "benchmarks" / "RESULTS.md"]
    broken = []
    for page in pages:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
                broken.append(f"{page.relative_to(PROJECT_ROOT)}: {target}")
    assert not broken, "\n".join(broken)
