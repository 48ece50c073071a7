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


PLOTS_JS = """els => els.map(e => {
    const box = e.getBoundingClientRect();
    const inside = r => r.width > 0 && r.height > 0 && r.left >= box.left - 1 && r.right <= box.right + 1
        && r.top >= box.top - 1 && r.bottom <= box.bottom + 1;
    const texts = sel => [...e.querySelectorAll(sel)].map(t => {
        const r = t.getBoundingClientRect(); const st = getComputedStyle(t);
        return {text: t.textContent, visible: inside(r) && st.visibility !== 'hidden' && st.display !== 'none'
                && Number(st.opacity) > 0}; });
    const series = [...e.querySelectorAll('g.series')].map(g => {
        const b = g.getBoundingClientRect();
        return {name: g.dataset.name, points: Number(g.dataset.points), w: b.width, h: b.height,
                markers: g.querySelectorAll('use').length}; });
    const grid = [...e.querySelectorAll('g.tick path[clip-path]')].filter(p => {
        const b = p.getBoundingClientRect(); return b.width > 50 || b.height > 50; }).length;
    const legend = [...e.querySelectorAll('g.legend')].map(g => ({
        visible: inside(g.getBoundingClientRect()),
        labels: [...g.querySelectorAll('text')].map(t => t.textContent),
        swatches: [...g.querySelectorAll('[id*="line2d"] path, [id*="line2d"] use')].filter(p => {
            const st = getComputedStyle(p); const c = st.stroke !== 'none' ? st.stroke : st.fill;
            return c && c !== 'none' && !/rgb\\(255, 255, 255\\)/.test(c) && p.getBoundingClientRect().width > 0;
        }).length }));
    return {w: box.width, h: box.height, label: e.getAttribute('aria-label'), series, grid, legend,
            xticks: texts('g.tick.x text'), yticks: texts('g.tick.y text'), texts: texts('text')}; })"""


def check_plots(page) -> list[dict]:
    """Every svg.plot on the page: a size, drawn series, at least two labelled ticks per axis, gridlines, a legend
    with a coloured swatch per entry, and every piece of text inside the plot (nothing clipped). Returns them."""
    plots = page.eval_on_selector_all("svg.plot", PLOTS_JS)
    assert plots, "no plots on the page"
    for plot in plots:
        where = plot["label"]
        assert plot["w"] > 100 and plot["h"] > 100, plot
        assert plot["series"] and all(s["points"] >= 1 for s in plot["series"]), where
        assert any(s["w"] > 0 or s["h"] > 0 for s in plot["series"]), f"nothing drawn in {where}"
        for axis in ("xticks", "yticks"):
            labels = [t for t in plot[axis] if t["text"].strip()]
            assert len(labels) >= 2 and all(t["visible"] for t in labels), (where, axis, labels)
        assert plot["grid"] >= 3, (where, "gridlines", plot["grid"])
        clipped = [t["text"] for t in plot["texts"] if t["text"].strip() and not t["visible"]]
        assert not clipped, (where, "text outside the plot", clipped)
        assert plot["legend"] and all(g["visible"] and g["labels"] and g["swatches"] >= len(g["labels"])
                                      for g in plot["legend"]), (where, plot["legend"])
    return plots


def check_report_in_browser(report: Path, summary: dict, screenshot: Path) -> dict:
    """Open report.html in headless chromium: every plot renders with a size, drawn series, ticks, gridlines and
    a legend (check_plots), the score table shows summary.json's numbers; saves a full-page screenshot. Returns
    what it saw."""
    executable = ensure_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        requests: list[str] = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(report.resolve().as_uri())
        plots = check_plots(page)
        cells = page.eval_on_selector_all("#scores td[data-key]",
                                          "els => Object.fromEntries(els.map(e => [e.dataset.key, e.innerText]))")
        reward_kl = page.eval_on_selector_all("#reward-kl svg.plot", "els => els.length")
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    expected = {f"gold.{k}": f"{v:.3f}" for k, v in summary["gold"].items() if v is not None}
    if summary.get("rm_accuracy") is not None:
        expected["rm_accuracy"] = f"{summary['rm_accuracy']:.3f}"
    shown = {k: v for k, v in cells.items() if k == "rm_accuracy" or k.count(".") == 1}  # not per-family cells
    assert shown == expected, (cells, expected)
    assert [u for u in requests if not u.startswith("file:")] == [], "the report must not touch the network"
    assert screenshot.stat().st_size > 10_000
    return {"plots": plots, "cells": cells, "reward_kl": reward_kl}
