"""The package's layers are checked, not described: import-linter's layers contract in pyproject.toml
([tool.importlinter]) holds, and it fails when a lower layer imports a higher one."""

import shutil
import subprocess
import sys
from pathlib import Path

from helpers import REPO, child_env

LINT = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
        "sys.exit(lint_imports_command())", "--no-cache"]


def lint(root: Path) -> subprocess.CompletedProcess:
    env = child_env()
    env["PYTHONPATH"] = str(root)
    return subprocess.run(LINT, cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_layer_contract_holds():
    result = lint(REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "1 kept, 0 broken" in result.stdout


def test_the_layer_contract_fails_on_an_import_from_a_higher_layer(tmp_path):
    for part in ("alignment", "reward"):
        shutil.copytree(REPO / part, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    text_module = tmp_path / "alignment" / "data" / "text.py"
    text_module.write_text(text_module.read_text() + "\nfrom alignment.stages import tail  # noqa: E402\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "BROKEN" in result.stdout and "alignment.data.text -> alignment.stages.tail" in result.stdout, result.stdout
