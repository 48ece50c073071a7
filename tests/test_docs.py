"""The documentation stays true: the recipe-key page is what the schema generates, every relative link in the
README and docs/ resolves, and the commands of docs/own-model.md run as written (and print what the page shows)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, align_cache, child_env  # noqa: F401

PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
OWN_MODEL = REPO / "docs" / "own-model.md"
REGENERATE = "python -m alignment.core.keydoc > docs/recipe-keys.md"

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```\s*$", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REF_LINK = re.compile(r"^\s*\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)


def test_recipe_keys_page_is_what_keydoc_prints():
    env = child_env({"PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")})
    printed = subprocess.run([sys.executable, "-m", "alignment.core.keydoc"], cwd=REPO, env=env, check=True,
                             capture_output=True, text=True).stdout
    committed = (REPO / "docs" / "recipe-keys.md").read_text()
    assert committed == printed, f"docs/recipe-keys.md is stale: regenerate it with `{REGENERATE}`"


def relative_links(page: Path) -> list[str]:
    """The link targets of a markdown page that are paths (no URL scheme, not an anchor of the page itself),
    outside code blocks and inline code, without their #anchor."""
    text = INLINE_CODE.sub("", FENCE.sub("", page.read_text()))
    targets = LINK.findall(text) + REF_LINK.findall(text)
    out = []
    for target in targets:
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # https:, mailto:, ... and anchors on the same page
        out.append(target.split("#", 1)[0])
    return out


def test_every_relative_link_resolves():
    assert OWN_MODEL in PAGES and len(PAGES) > 10
    broken = []
    for page in PAGES:
        for target in relative_links(page):
            if not (page.parent / target).exists():  # a file, or a folder (GitHub lists it)
                broken.append(f"{page.relative_to(REPO)}: ({target})")
    assert not broken, "links to files that do not exist:\n" + "\n".join(broken)


def blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(page.read_text()) if lang == language]


def run_block(block: str, cwd: Path, env: dict, timeout: float = 300) -> tuple[int, str, float]:
    """`bash -e -o pipefail -c BLOCK` in cwd; on timeout its whole process group is killed."""
    start = time.monotonic()
    proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", block], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        return -9, output + f"\n(timed out after {timeout:.0f}s)", time.monotonic() - start
    return proc.returncode, output, time.monotonic() - start


@pytest.mark.slow
def test_own_model_page_commands_run(tmp_path, align_cache):
    """Every ```bash block of docs/own-model.md, in order, as a user runs them from the repository root: here from
    a scratch directory that sees the repository's configs/ through a link, with `align` and `python` on PATH
    running this checkout, so the page's my-run/ is written under tmp_path and nothing into the repository. Every
    line of the page's ```text blocks (the output it shows) must appear in what the commands printed."""
    commands = blocks(OWN_MODEL, "bash")
    assert len(commands) >= 6
    for block in commands:
        assert "my-run" in block, f"a block of docs/own-model.md writes outside my-run/:\n{block}"
    repo_had_my_run = (REPO / "my-run").exists()

    (tmp_path / "configs").symlink_to(REPO / "configs", target_is_directory=True)
    bin_dir = tmp_path / ".bin"
    bin_dir.mkdir()
    pythonpath = f'PYTHONPATH="{REPO}${{PYTHONPATH:+:$PYTHONPATH}}"'
    for name, module in (("align", " -m alignment.cli"), ("python", "")):
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\n{pythonpath} exec "{sys.executable}"{module} "$@"\n')
        shim.chmod(0o755)
    env = child_env({"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "ALIGN_CACHE": str(align_cache)})
    env.pop("PYTHONPATH", None)

    printed, times = [], []
    for i, block in enumerate(commands, 1):
        code, output, seconds = run_block(block, tmp_path, env)
        printed.append(output)
        times.append(f"block {i}: {seconds:.1f}s")
        assert code == 0, f"block {i} of docs/own-model.md exited {code}:\n{block}\n--- output:\n{output[-6000:]}"
    print("; ".join(times))

    everything = "\n".join(printed)
    shown = [line for text in blocks(OWN_MODEL, "text") for line in text.splitlines() if line.strip()]
    assert shown, "docs/own-model.md shows no output"
    missing = [line for line in shown if line not in everything]
    assert not missing, "output docs/own-model.md shows that the commands did not print:\n" + "\n".join(missing)
    assert everything.count("finished with the same inputs, skipped") == 4  # the page: the pipeline skips each stage
    assert (tmp_path / "my-run" / "summary.json").is_file() and (tmp_path / "my-run" / "eval" / "eval.json").is_file()
    assert repo_had_my_run or not (REPO / "my-run").exists(), "the page's commands wrote my-run/ into the repository"
