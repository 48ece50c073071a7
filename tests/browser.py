"""A real headless browser for report tests: Debian's chromium driven by Playwright.

The setup installs what is missing (apt-get for chromium, pip for playwright), so a fresh machine passes;
Playwright's own browser download cannot work offline, hence executable_path.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"


def ensure_browser() -> str:
    if not Path(CHROMIUM).exists():
        if os.geteuid() != 0 or shutil.which("apt-get") is None:
            raise RuntimeError(f"{CHROMIUM} is missing and this user cannot apt-get install chromium")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, timeout=900, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True, timeout=1500, env=env)
    try:
        importlib.import_module("playwright")
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"], check=True, timeout=900)
    return CHROMIUM


def check_report_in_browser(report: Path, summary: dict, screenshot: Path) -> dict:
    """Open report.html in headless chromium: every plot renders with a size and drawn series, the score
    table shows summary.json's numbers; saves a full-page screenshot. Returns what it saw."""
    executable = ensure_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report.resolve().as_uri())
        plots = page.eval_on_selector_all("svg.plot", """els => els.map(e => {
            const box = e.getBoundingClientRect();
            const lines = [...e.querySelectorAll('polyline.series')].map(l => {
                const b = l.getBBox(); return {points: l.points.numberOfItems, w: b.width, h: b.height}; });
            const dots = [...e.querySelectorAll('circle')].filter(c => c.getBBox().width > 0).length;
            return {w: box.width, h: box.height, label: e.getAttribute('aria-label'), lines, dots}; })""")
        cells = page.eval_on_selector_all("#scores td[data-key]",
                                          "els => Object.fromEntries(els.map(e => [e.dataset.key, e.innerText]))")
        reward_kl = page.eval_on_selector_all("#reward-kl svg.plot", "els => els.length")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert plots, "no plots in the report"
    for plot in plots:
        assert plot["w"] > 100 and plot["h"] > 100, plot
        assert plot["lines"] and all(line["points"] >= 1 for line in plot["lines"]), plot
        # a line with extent, or markers (a series whose points all coincide draws as dots)
        assert any(line["w"] > 0 or line["h"] > 0 for line in plot["lines"]) or plot["dots"] > 0, \
            f"nothing drawn in {plot['label']}: {plot}"
    expected = {f"gold.{k}": f"{v:.3f}" for k, v in summary["gold"].items() if v is not None}
    if summary.get("rm_accuracy") is not None:
        expected["rm_accuracy"] = f"{summary['rm_accuracy']:.3f}"
    assert cells == expected, (cells, expected)
    assert [u for u in requests if not u.startswith("file:")] == [], "the report must not touch the network"
    assert screenshot.stat().st_size > 10_000
    return {"plots": plots, "cells": cells, "reward_kl": reward_kl}
