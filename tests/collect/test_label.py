"""`align label`: agreement math by hand, the store's rules, the live server's refusals, durability under
kill -9, and keyboard-only sessions in a real browser (with hostile model output that must run nothing): markdown
rendered with raw HTML off, a long answer scrolling in its pane with the buttons in view, guidelines, skip, back
and undo that restore the earlier choice, thumbs up / down exported as unpaired rows.

ALIGN_SCREENSHOTS=DIR keeps the browser tests' screenshots there (docs/screenshots/ holds the committed ones)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from alignment.collect.label import results
from alignment.collect.label.agreement import cohen_kappa, krippendorff_alpha_nominal, majority, wilson_interval
from alignment.collect.label.server import markdown_renderer
from alignment.collect.label.store import Item, Store, StoreError, preferred_candidate
from helpers import align_cache, child_env, free_port  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
HOSTILE = ['<script>window.__xss = 1</script>', '<img src=x onerror="window.__xss = 2">']
MARKDOWN = """Sure, **here** is the code:

```python
def add(a, b):
    return a + b
```

| x | y |
|---|---|
| 1 | 2 |

<script>window.__xss = 3</script> [a link](javascript:window.__xss=4) ![pic](http://example.invalid/x.png)"""
LONG = "A long answer.\n\n" + "\n\n".join(f"Paragraph {i}: " + "lorem ipsum dolor sit amet " * 12 for i in range(80))


def shots_dir(tmp_path) -> Path:
    return Path(os.environ.get("ALIGN_SCREENSHOTS") or tmp_path)


def test_agreement_by_hand():
    # Cohen (1960) 2x2: 20 yes-yes, 5 yes-no, 10 no-yes, 15 no-no: p_o = 0.7, p_e = 0.5*0.6 + 0.5*0.4 = 0.5.
    first = ["y"] * 25 + ["n"] * 25
    second = ["y"] * 20 + ["n"] * 5 + ["y"] * 10 + ["n"] * 15
    assert cohen_kappa(first, second) == pytest.approx(0.4)
    assert cohen_kappa(["a", "a"], ["a", "a"]) == 1.0
    # Krippendorff (2011), the nominal example with 4 observers, 12 units and missing values: alpha = 0.743.
    units = [[1, 1, 1], [2, 2, 3, 2], [3, 3, 3, 3], [3, 3, 3, 3], [2, 2, 2, 2], [1, 2, 3, 4], [4, 4, 4, 4],
             [1, 1, 2, 1], [2, 2, 2, 2], [5, 5, 5], [1, 1], [3]]
    assert krippendorff_alpha_nominal(units) == pytest.approx(0.743, abs=5e-4)
    lo, hi = wilson_interval(5, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.2366, 0.7634)
    assert majority(["a", "b", "a"]) == ("a", 2 / 3) and majority(["a", "b"]) == ("no_majority", 0.5)


def _store(tmp_path, n=4, hostile=False) -> Store:
    store = Store(tmp_path / "labels.db")
    items = [Item(f"i{k}", f"What is {k} + {k}?", str(2 * k), str(2 * k + 1), {"ai": {"a": 1.0, "b": 0.0}})
             for k in range(n)]
    if hostile:
        items.append(Item("evil", HOSTILE[0], HOSTILE[1], "plain", {}))
    store.add_items(items)
    return store


def test_store_sides_undo_double_submit_and_export(tmp_path):
    assert preferred_candidate("left", "b") == "b" and preferred_candidate("right", "b") == "a"
    assert preferred_candidate("tie", "a") is None
    store = _store(tmp_path)
    token = store.add_annotator("ann")
    me, _ = store.annotator_for(token)
    first, left = store.next_item(me)
    assert first.id == "i0"
    store.add_label(me, "i0", "left" if left == "a" else "right", strength=2)  # prefers a, whichever side
    with pytest.raises(StoreError) as err:
        store.add_label(me, "i0", "tie")
    assert err.value.status == 409
    with pytest.raises(StoreError) as err:
        store.add_label(me, "nope", "tie")
    assert err.value.status == 404
    with pytest.raises(StoreError) as err:
        store.add_label(me, "i1", "tie", strength=2)  # no strength on a tie
    assert err.value.status == 422
    store.add_label(me, "i1", "both_bad")
    assert store.undo_last(me) == "i1" and store.next_item(me)[0].id == "i1"
    store.add_label(me, "i1", "tie")
    report = results.export(store, tmp_path / "out.jsonl")
    assert report["written"] == 1 and report["dropped"] == {"tie": 1, "both_bad": 0, "no_majority": 0,
                                                             "low_agreement": 0, "not_trainable": 0, "unlabelled": 2}
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert (row["chosen"], row["rejected"]) == ("0", "1") and row["provenance"]["strength"] == 2
    assert row["provenance"]["shown_left"] == {"ann": left}
    # what align rm / align dpo read: the explicit shape
    from alignment.data.sources import read_rows
    from alignment.data.preference import to_pair

    pair = to_pair(read_rows(str(tmp_path / "out.jsonl"))[0])
    assert pair.chosen == "0" and pair.rejected == "1"
    assert results.stats(store)["human_ai_agreement"] == {"items": 1, "agreement": 1.0}


def test_export_keeps_the_rows_chat_structure(tmp_path):
    """Message-list prompts and responses are shown as text but exported as the message lists they were, so
    align rm / dpo render them through the chat template, not as plain text."""
    source = tmp_path / "pairs.jsonl"
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    source.write_text(json.dumps({"prompt": prompt, "chosen": [{"role": "assistant", "content": "4"}],
                                  "rejected": [{"role": "assistant", "content": "5"}], "id": "q1",
                                  "score_chosen": 1.0, "score_rejected": 0.0}) + "\n")
    store = Store(tmp_path / "s.db")
    store.add_items(results.items_from_pairs(str(source)))
    me = store.annotator_for(store.add_annotator("x"))[0]
    item, left = store.next_item(me)
    assert "2+2?" in item.prompt and item.a == "4"  # flat text on the page
    store.add_label(me, "q1", "right" if left == "a" else "left")  # prefers b ("5")
    results.export(store, tmp_path / "out.jsonl")
    row = json.loads((tmp_path / "out.jsonl").read_text())
    assert row["prompt"] == prompt and row["chosen"] == [{"role": "assistant", "content": "5"}]
    assert "raw" not in row["provenance"] and row["provenance"]["ai"] == {"a": 1.0, "b": 0.0}


def test_overlap_assigns_each_item_to_n_annotators_and_kappa_per_pair(tmp_path):
    store = _store(tmp_path, n=6)
    ids = [store.annotator_for(store.add_annotator(name, overlap=2))[0] for name in ("x", "y", "z")]
    counts = store.db.execute("SELECT COUNT(*) FROM assignments GROUP BY item_id").fetchall()
    assert [c for (c,) in counts] == [2] * 6  # x and y take everything, z nothing
    for who in ids[:2]:
        while (nxt := store.next_item(who)) is not None:
            item, left = nxt
            store.add_label(who, item.id, "left" if left == "a" else "right")
    st = results.stats(store)
    assert st["cohen_kappa"] == {"x|y": {"items": 6, "kappa": 1.0}} and st["krippendorff_alpha"] == 1.0


class Server:
    def __init__(self, store_path: Path):
        self.port = free_port()
        self.proc = subprocess.Popen([sys.executable, "-m", "alignment.cli", "label", "serve", str(store_path),
                                      "--port", str(self.port)], cwd=REPO, env=child_env(),
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(self.proc.stdout.read().decode())
                time.sleep(0.2)
        raise RuntimeError("label server did not start within 60 s")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def printed(self, lines: int) -> list[str]:
        """The first lines `align label serve` printed (it prints them before it listens)."""
        return [self.proc.stdout.readline().decode().rstrip("\n") for _ in range(lines)]

    def request(self, method: str, path: str, body: bytes | dict | None = None, headers: dict | None = None):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        req = urllib.request.Request(self.url(path), data=data, method=method,
                                     headers={"Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)


def test_server_refusals_privacy_and_kill_9_durability(tmp_path):
    store = _store(tmp_path, n=6)
    tokens = {name: store.add_annotator(name) for name in ("me", "other")}
    store.close()
    server = Server(tmp_path / "labels.db")
    try:
        status, nxt = server.request("GET", f"/api/next?token={tokens['me']}")
        assert status == 200
        auth = {"X-Annotator-Token": tokens["me"], "X-CSRF-Token": nxt["csrf"]}
        item = nxt["item"]["id"]
        assert server.request("GET", "/api/next")[0] == 401
        assert server.request("POST", "/api/label", {"item_id": item, "choice": "left"},
                              {"X-Annotator-Token": tokens["me"]})[0] == 403  # no CSRF token
        other_csrf = server.request("GET", f"/api/next?token={tokens['other']}")[1]["csrf"]
        assert server.request("POST", "/api/label", {"item_id": item, "choice": "left"},
                              {"X-Annotator-Token": tokens["me"], "X-CSRF-Token": other_csrf})[0] == 403
        assert server.request("POST", "/api/label", {"item_id": "missing", "choice": "left"}, auth)[0] == 404
        assert server.request("POST", "/api/label", {"item_id": item, "choice": "maybe"}, auth)[0] == 422
        big = json.dumps({"item_id": item, "choice": "left", "rationale": "x" * 20000}).encode()
        assert server.request("POST", "/api/label", big, auth)[0] == 413
        assert server.request("POST", "/api/label", b"not json", auth)[0] == 400
        acknowledged = []
        for _ in range(3):
            nxt = server.request("GET", f"/api/next?token={tokens['me']}")[1]
            status, body = server.request("POST", "/api/label", {"item_id": nxt["item"]["id"], "choice": "tie"}, auth)
            assert status == 200
            acknowledged.append(nxt["item"]["id"])
        assert server.request("POST", "/api/label", {"item_id": acknowledged[0], "choice": "left"}, auth)[0] == 409
        assert server.request("GET", f"/api/labels?token={tokens['other']}")[1] == {"labels": []}
        mine = server.request("GET", f"/api/labels?token={tokens['me']}")[1]["labels"]
        assert [x["item_id"] for x in mine] == acknowledged
        server.kill9()  # right after the last acknowledgement
    finally:
        server.stop()
    reopened = Store(tmp_path / "labels.db")
    assert [x["item_id"] for x in reopened.labels()] == acknowledged  # nothing acknowledged was lost, nothing extra


@pytest.mark.slow
def test_keyboard_only_labelling_in_a_real_browser_with_hostile_text(tmp_path):
    from browser import ensure_browser

    executable = ensure_browser()
    from playwright.sync_api import sync_playwright

    store = _store(tmp_path, n=3, hostile=True)
    token = store.add_annotator("kb")
    me, _ = store.annotator_for(token)
    sides = {row[0]: row[1] for row in store.db.execute("SELECT item_id, left_side FROM assignments")}
    store.close()
    server = Server(tmp_path / "labels.db")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(server.url(f"/label?token={token}"))
            plan = [("1", "w"), ("2", None), ("3", None), ("1", "e")]  # i0, i1, i2, evil
            shown = []
            for choice_key, strength_key in plan:
                shown.append(page.input_value("#item"))
                page.keyboard.press(choice_key)
                if strength_key:
                    page.keyboard.press(strength_key)
                with page.expect_navigation():
                    page.keyboard.press("Enter")
            assert page.is_visible("#done")
            with page.expect_navigation():
                page.keyboard.press("u")  # undo the last label: the hostile item comes back
            assert page.input_value("#item") == "evil"
            # model output and prompts are text on the page, never markup that runs
            assert page.evaluate("window.__xss") is None
            assert page.inner_text("#prompt") == HOSTILE[0]
            assert HOSTILE[1] in page.inner_text(".pair")
            page.screenshot(path=str(tmp_path / "label-page.png"), full_page=True)
            page.keyboard.press("4")
            with page.expect_navigation():
                page.keyboard.press("Enter")
            assert page.is_visible("#done") and "4 / 4 labelled" in page.inner_text("#progress")
            browser.close()
    finally:
        server.stop()
    assert shown == ["i0", "i1", "i2", "evil"]
    store = Store(tmp_path / "labels.db")
    got = {x["item_id"]: (x["choice"], x["preferred"], x["strength"]) for x in store.labels()}

    def pref(item, side):  # the candidate shown on that side
        return sides[item] if side == "left" else ("b" if sides[item] == "a" else "a")

    assert got == {"i0": ("left", pref("i0", "left"), 2), "i1": ("right", pref("i1", "right"), None),
                   "i2": ("tie", None, None), "evil": ("both_bad", None, None)}
    report = results.export(store, tmp_path / "export.jsonl")
    assert report["written"] == 2 and report["dropped"]["tie"] == 1 and report["dropped"]["both_bad"] == 1
    assert (tmp_path / "label-page.png").stat().st_size > 5000


def label_like_the_judge(server: "Server", token: str) -> int:
    """A scripted annotator over HTTP: prefers the candidate the AI judge scored higher."""
    from alignment.collect.label.store import Store as _Store  # noqa: F401  (documentation: same store)

    status, nxt = server.request("GET", f"/api/next?token={token}")
    headers = {"X-Annotator-Token": token, "X-CSRF-Token": nxt["csrf"]}
    done = 0
    while nxt["item"] is not None:
        item = nxt["item"]["id"]
        ai = ITEM_AI[item]
        left_is_a = nxt["left"] == ITEM_TEXT[item]["a"]
        better_a = ai["a"] > ai["b"]
        choice = "tie" if ai["a"] == ai["b"] else ("left" if better_a == left_is_a else "right")
        assert server.request("POST", "/api/label", {"item_id": item, "choice": choice}, headers)[0] == 200
        done += 1
        nxt = server.request("GET", f"/api/next?token={token}")[1]
    return done


ITEM_AI: dict = {}
ITEM_TEXT: dict = {}


@pytest.mark.slow
def test_pairs_to_labels_to_export_to_a_reward_model(tmp_path, align_cache):
    """align pairs -> align label (a scripted annotator over HTTP) -> export -> align rm trains on it."""
    from helpers import read_metrics, run_cli

    import torch

    from alignment.core.models import load_model, load_tokenizer, resolve_model_path
    from reward.model import ensure_distinct_pad

    # The tiny policy never earns gold credit, so the AI judge is a tiny RM with a random unit-std head
    # (its scores never tie); the scripted annotator answers like it (with SmolLM2 it would be the verifier).
    path = resolve_model_path("tiny-llama")
    tok, judge_model = load_tokenizer(path), load_model(path, "reward").eval()
    ensure_distinct_pad(tok, judge_model)
    with torch.no_grad():
        judge_model.score.weight.copy_(torch.randn(judge_model.score.weight.shape,
                                                   generator=torch.Generator().manual_seed(0)))
    judge = tmp_path / "judge"
    judge_model.save_pretrained(judge)
    tok.save_pretrained(judge)
    pairs = tmp_path / "pairs.jsonl"
    run_cli(["pairs", "--model", "tiny-llama", "--prompts", "builtin:prompts_eval", "--judge", str(judge), "--out",
             str(pairs), "--num-prompts", "24", "--samples", "3", "--max-new-tokens", "6"]).check()
    db = tmp_path / "labels.db"
    run_cli(["label", "init", str(db), "--pairs", str(pairs)]).check()
    out = run_cli(["label", "annotator", str(db), "scripted"]).check().output
    token = out.strip().splitlines()[-1].split("token=")[1]
    store = Store(db)
    for item in store.items():
        ITEM_AI[item.id] = item.meta["ai"]
        ITEM_TEXT[item.id] = {"a": item.a, "b": item.b}
    n_items = len(store.items())
    store.close()
    server = Server(db)
    try:
        assert label_like_the_judge(server, token) == n_items > 0
    finally:
        server.stop()
    stats = json.loads(run_cli(["label", "stats", str(db)]).check().output)
    assert stats["human_ai_agreement"]["agreement"] == 1.0 and stats["labels"] == n_items
    export = tmp_path / "human.jsonl"
    run_cli(["label", "export", str(db), "--out", str(export)]).check()
    rows = [json.loads(x) for x in export.read_text().splitlines()]
    assert len(rows) == n_items  # the judge never ties a pair align pairs kept
    rm = tmp_path / "rm"
    run_cli(["rm", "configs/tiny/rm.yaml", "--set", f"output_dir={rm}", "--set", f"data.train={export}",
             "--set", "train.max_steps=2", "--set", "logging.progress_bar=false", "--set", "train.precision=fp32"]).check()
    assert (rm / "final" / "config.json").is_file()
    assert all(math.isfinite(m["loss"]) for m in read_metrics(rm) if "loss" in m)


ARENA_PROMPTS = ["Name a prime number.", "What is 2 + 3?", "Say hello in French.", "Spell 'cat' backwards."]
ARENA_ANSWERS = {"sft": ["I am not sure.", "Maybe 6.", "Hello.", "cat"],
                 "dpo": ["7 is a prime number.", "2 + 3 = 5.", "Bonjour !", "tac"]}


@pytest.mark.slow
def test_arena_two_policies_judged_blind_in_a_real_browser_give_a_human_win_rate(tmp_path):
    """Arena mode end to end: two policies' answers -> `align label init --arena` -> one annotator by keyboard in a
    real browser, one over HTTP -> `align label stats`: the human win rate with its Wilson interval, as counted."""
    from browser import ensure_browser

    executable = ensure_browser()
    from playwright.sync_api import sync_playwright

    from helpers import run_cli

    for name, answers in ARENA_ANSWERS.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": i, "prompt": p, "response": a}) + "\n" for i, (p, a) in enumerate(zip(ARENA_PROMPTS, answers))))
    db = tmp_path / "arena.db"
    run_cli(["label", "init", str(db), "--arena", str(tmp_path / "sft.jsonl"), str(tmp_path / "dpo.jsonl"),
             "--names", "sft", "dpo"]).check()
    tokens = {}
    for who in ("alice", "bob"):
        out = run_cli(["label", "annotator", str(db), who]).check().output
        tokens[who] = out.strip().splitlines()[-1].split("token=")[1]
    # alice (browser, keyboard): prefers dpo on the first three items she is shown, a tie on the last.
    # bob (HTTP): prefers sft on the first two items he is shown, dpo on the others.
    server = Server(db)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, headless=True, args=["--no-sandbox"])
            page = browser.new_page()
            page.goto(server.url(f"/label?token={tokens['alice']}"))
            assert page.inner_text("#question").startswith("Arena: two policies answered this prompt")
            assert "sft" not in page.content() and "dpo" not in page.content()  # blind: no policy names
            for n in range(4):
                left = page.inner_text("#left pre")
                dpo_left = left in ARENA_ANSWERS["dpo"]
                key = "3" if n == 3 else ("1" if dpo_left else "2")
                page.keyboard.press(key)
                with page.expect_navigation():
                    page.keyboard.press("Enter")
            assert page.is_visible("#done")
            browser.close()
        status, nxt = server.request("GET", f"/api/next?token={tokens['bob']}")
        headers = {"X-Annotator-Token": tokens["bob"], "X-CSRF-Token": nxt["csrf"]}
        n = 0
        while nxt["item"] is not None:
            want = "sft" if n < 2 else "dpo"
            choice = "left" if nxt["left"] in ARENA_ANSWERS[want] else "right"
            assert server.request("POST", "/api/label", {"item_id": nxt["item"]["id"], "choice": choice},
                                  headers)[0] == 200
            nxt, n = server.request("GET", f"/api/next?token={tokens['bob']}")[1], n + 1
        assert n == 4
    finally:
        server.stop()
    out = run_cli(["label", "stats", str(db)]).check().output
    stats = json.loads(out[out.index("{"):])
    arena = stats["arena"]["sft vs dpo"]
    # sft's wins: alice 0 + a tie (0.5), bob 2 -> 2.5 of 8 votes
    assert arena["votes"] == 8
    assert arena["win_rate"] == pytest.approx(2.5 / 8)
    assert arena["ci95"] == pytest.approx(list(wilson_interval(2.5, 8)))
    lo, hi = arena["ci95"]
    assert lo < 2.5 / 8 < hi


def test_markdown_is_rendered_with_raw_html_off():
    html = markdown_renderer().render(MARKDOWN)
    assert "<strong>here</strong>" in html and '<pre><code class="language-python">def add' in html
    assert "<table>" in html and "<td>1</td>" in html
    assert "<script" not in html and "&lt;script&gt;window.__xss = 3&lt;/script&gt;" in html
    assert "javascript:" not in html.split("[a link]")[0] and '<a href="javascript' not in html  # refused as a link
    assert "<img" not in html and "[image: pic http://example.invalid/x.png]" in html  # never fetched
    link = markdown_renderer().render("[docs](https://example.invalid/docs)")
    assert 'target="_blank"' in link and 'rel="noopener noreferrer nofollow"' in link
    for text in HOSTILE:
        assert "<script" not in markdown_renderer().render(text) and "<img" not in markdown_renderer().render(text)


def test_skip_back_replace_and_undo_that_keeps_the_choice(tmp_path):
    store = _store(tmp_path, n=4)
    me = store.annotator_for(store.add_annotator("ann"))[0]
    store.add_label(me, "i0", "left", strength=2, rationale="clear")
    assert store.next_item(me)[0].id == "i1"
    store.skip(me, "i1")  # comes back after the others
    assert store.next_item(me)[0].id == "i2" and store.skipped(me) == 1
    with pytest.raises(StoreError) as err:
        store.skip(me, "i0")  # labelled already: go back instead
    assert err.value.status == 409
    store.add_label(me, "i2", "tie")
    assert store.history(me) == ["i0", "i2"]
    # back: the earlier label of i0, changed in place (same label, same position in the history)
    assert store.label_of(me, "i0") == {"choice": "left", "strength": 2, "rationale": "clear"}
    with pytest.raises(StoreError) as err:
        store.add_label(me, "i0", "right")
    assert err.value.status == 409
    first_id = store.labels(me)[0]["id"]
    assert store.add_label(me, "i0", "right", rationale="changed my mind", replace=True) == first_id
    assert store.label_of(me, "i0")["choice"] == "right" and store.history(me) == ["i0", "i2"]
    assert store.labels(me)[0]["updated"] is not None
    # undo takes back the latest label (the replaced one) and keeps its choice as a draft; the item comes first
    assert store.undo_last(me) == "i0"
    assert store.draft(me, "i0") == {"choice": "right", "strength": None, "rationale": "changed my mind"}
    assert store.next_item(me)[0].id == "i0"
    store.add_label(me, "i0", "right")
    assert store.draft(me, "i0") is None
    assert [store.next_item(me)[0].id] == ["i3"]  # then the rest, the skipped one last
    store.add_label(me, "i3", "both_bad")
    assert store.next_item(me)[0].id == "i1" and store.skipped(me) == 1
    store.add_label(me, "i1", "tie")
    assert store.next_item(me) is None and store.skipped(me) == 0


def test_a_version_1_store_is_migrated_in_place(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript("""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (id TEXT PRIMARY KEY, position INTEGER NOT NULL, prompt TEXT NOT NULL, a TEXT NOT NULL,
    b TEXT NOT NULL, meta TEXT NOT NULL DEFAULT '{}');
CREATE TABLE annotators (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE,
    created REAL NOT NULL);
CREATE TABLE assignments (item_id TEXT NOT NULL REFERENCES items(id), annotator_id TEXT NOT NULL
    REFERENCES annotators(id), left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')), shown REAL,
    PRIMARY KEY (item_id, annotator_id));
CREATE TABLE labels (id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL REFERENCES items(id),
    annotator_id TEXT NOT NULL REFERENCES annotators(id), choice TEXT NOT NULL,
    preferred TEXT CHECK (preferred IN ('a', 'b') OR preferred IS NULL), strength INTEGER, rationale TEXT,
    left_side TEXT NOT NULL, created REAL NOT NULL, seconds REAL, UNIQUE (item_id, annotator_id));
INSERT INTO meta VALUES ('schema_version', '1');
INSERT INTO items VALUES ('x', 0, 'p', 'a', 'b', '{}'), ('y', 1, 'q', 'c', 'd', '{}');
INSERT INTO annotators VALUES ('ann1', 'old', 'hash', 0);
INSERT INTO assignments VALUES ('x', 'ann1', 'a', NULL), ('y', 'ann1', 'b', NULL);
INSERT INTO labels (item_id, annotator_id, choice, preferred, left_side, created) VALUES ('x', 'ann1', 'left', 'a', 'a', 1);
""")
    db.commit()
    db.close()
    store = Store(path)
    assert store.get_meta("schema_version") == "2" and store.kind() == "pair"
    assert [label["choice"] for label in store.labels()] == ["left"]
    assert store.next_item("ann1")[0].id == "y"
    store.skip("ann1", "y")
    assert store.undo_last("ann1") == "x" and store.draft("ann1", "x")["choice"] == "left"


def _responses(tmp_path) -> Path:
    rows = [{"id": "r1", "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
             "completion": [{"role": "assistant", "content": "**4**"}]},
            {"id": "r2", "prompt": "Capital of France?", "completion": "Lyon", "label": False},
            {"id": "r3", "messages": [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}]},
            {"id": "r4", "prompt": "Name a colour.", "response": MARKDOWN}]
    path = tmp_path / "responses.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_thumbs_items_stats_and_unpaired_export(tmp_path):
    from alignment.data.shapes import shape_of

    store = Store(tmp_path / "t.db")
    items = results.items_from_responses(str(_responses(tmp_path)))
    assert [i.kind for i in items] == ["single"] * 4 and items[0].a == "**4**" and items[2].prompt == "Say hi"
    store.add_items(items)
    with pytest.raises(StoreError, match="one store holds pairs"):
        store.add_items([Item("p", "q", "a", "b", {})])  # never both kinds in one store
    x, y = (store.annotator_for(store.add_annotator(n))[0] for n in ("x", "y"))
    with pytest.raises(StoreError) as err:
        store.add_label(x, "r1", "left")  # pair choices mean nothing here
    assert err.value.status == 422
    for who, votes in ((x, ["good", "bad", "good", "bad"]), (y, ["good", "bad", "bad", "good"])):
        for item_id, vote in zip(("r1", "r2", "r3", "r4"), votes):
            store.add_label(who, item_id, vote, rationale="wrong city" if item_id == "r2" else None)
    st = results.stats(store)
    thumbs = st["thumbs"]
    assert thumbs["votes"] == {"good": 4, "bad": 4} and thumbs["good_share"] == 0.5
    assert thumbs["pairwise_agreement"] == 0.5 and thumbs["unanimous_share"] == 0.5
    assert thumbs["agreement_with_given_labels"] == {"items": 1, "agreement": 1.0}  # r2 was given as bad
    assert st["cohen_kappa"]["x|y"]["kappa"] == pytest.approx(0.0) and st["krippendorff_alpha"] is not None
    report = results.export(store, tmp_path / "kto.jsonl")
    assert report["written"] == 2 and report["dropped"] == {"no_majority": 2, "low_agreement": 0, "unlabelled": 0}
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "kto.jsonl").read_text().splitlines())}
    assert rows["r1"]["prompt"][1] == {"role": "user", "content": "2+2?"}  # message lists kept as they were
    assert rows["r1"]["completion"] == [{"role": "assistant", "content": "**4**"}] and rows["r1"]["label"] is True
    assert rows["r2"]["prompt"] == "Capital of France?" and rows["r2"]["label"] is False
    assert rows["r2"]["provenance"]["rationales"] == ["wrong city", "wrong city"]
    assert all(shape_of(r, "unpaired") == "unpaired" and isinstance(r["label"], bool) for r in rows.values())


def test_serve_prints_its_address_and_annotator_links_follow_it(tmp_path):
    from helpers import run_cli

    store = _store(tmp_path, n=2)
    first = store.add_annotator("alice")
    store.close()
    server = Server(tmp_path / "labels.db")
    try:
        printed = server.printed(3)
        assert printed[0] == (f"align label: serving {tmp_path / 'labels.db'} at http://127.0.0.1:{server.port}/label "
                              "(Ctrl-C stops)"), printed
        assert printed[2].split() == ["alice:", "0/2", "labelled", f"http://127.0.0.1:{server.port}/label?token=<alice's",
                                      "token>"]
        out = run_cli(["label", "annotator", str(tmp_path / "labels.db"), "bob"]).check().output
        link = out.strip().splitlines()[-1]
        assert link.startswith(f"http://127.0.0.1:{server.port}/label?token=")  # the server's port, not 8765
        status, body = server.request("GET", "/api/next?token=" + link.split("token=")[1])
        assert status == 200 and body["item"]["id"] == "i0"
        out = run_cli(["label", "annotator", str(tmp_path / "labels.db"), "alice", "--reissue", "--url",
                       "https://label.example.invalid/"]).check().output
        new = out.strip().splitlines()[-1]
        assert new.startswith("https://label.example.invalid/label?token=")
        assert server.request("GET", f"/api/next?token={first}")[0] == 401  # the old link stops working
        assert server.request("GET", "/api/next?token=" + new.split("token=")[1])[0] == 200
        out = run_cli(["label", "annotator", str(tmp_path / "labels.db"), "carol", "--port", "9000"]).check().output
        assert out.strip().splitlines()[-1].startswith("http://127.0.0.1:9000/label?token=")
    finally:
        server.stop()


def _browser(p):
    from browser import ensure_browser

    return p.chromium.launch(executable_path=ensure_browser(), headless=True, args=["--no-sandbox"])


def _in_view(page, selector: str) -> bool:
    return page.eval_on_selector(selector, """e => { const r = e.getBoundingClientRect();
        return r.width > 0 && r.height > 0 && r.top >= 0 && r.left >= 0 && r.bottom <= innerHeight
               && r.right <= innerWidth; }""")


@pytest.mark.slow
def test_markdown_long_answers_and_guidelines_in_a_real_browser(tmp_path):
    """Markdown shows as markdown (bold, a code block in monospace, a table) and its <script> runs nothing; a very
    long answer scrolls inside its own pane while the choice buttons stay on screen; the guidelines are on the page."""
    from playwright.sync_api import sync_playwright

    from helpers import run_cli

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"id": "md", "prompt": "Write `add` and a table.", "chosen": MARKDOWN,
                                 "rejected": LONG}) + "\n")
    guide = tmp_path / "guide.md"
    guide.write_text("## How to judge\n\n- Prefer **correct** answers over long ones.\n- Code must run.\n"
                     "- Unsure? Skip with `s`.\n")
    db = tmp_path / "md.db"
    out = run_cli(["label", "init", str(db), "--pairs", str(pairs), "--guidelines", str(guide)]).check().output
    assert "guidelines (5 lines)" in out
    token = run_cli(["label", "annotator", str(db), "ann"]).check().output.strip().splitlines()[-1].split("token=")[1]
    shots = shots_dir(tmp_path)
    server = Server(db)
    try:
        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            requests = []
            page.on("request", lambda r: requests.append(r.url))
            page.goto(server.url(f"/label?token={token}"))
            long_side = "#left" if "Paragraph 79" in page.inner_text("#left .md") else "#right"
            md_side = "#right" if long_side == "#left" else "#left"
            # markdown rendered: bold, a monospace code block, a table; the script text shown, never run
            assert page.inner_text(f"{md_side} .md strong") == "here"
            code_font = page.eval_on_selector(f"{md_side} .md pre code", "e => getComputedStyle(e).fontFamily")
            assert "mono" in code_font.lower(), code_font
            assert page.eval_on_selector_all(f"{md_side} .md table td", "els => els.map(e => e.innerText)") == ["1", "2"]
            assert "<script>window.__xss = 3</script>" in page.inner_text(f"{md_side} .md")
            assert page.evaluate("window.__xss") is None
            assert page.query_selector(f"{md_side} .md a[href^=javascript]") is None
            assert [u for u in requests if "example.invalid" in u] == []  # the image is not fetched
            # the guidelines, rendered, open on the first item; g folds them
            assert page.is_visible("#guidelines .md strong") and "How to judge" in page.inner_text("#guidelines h2")
            # a long answer scrolls in its own pane: the page does not grow, the buttons stay in view
            pane = f"{long_side} .answer"
            sizes = page.eval_on_selector(pane, "e => [e.scrollHeight, e.clientHeight]")
            assert sizes[0] > 3 * sizes[1], sizes
            assert page.evaluate("document.scrollingElement.scrollHeight <= innerHeight + 1")
            for selector in ('button[data-choice="left"]', 'button[data-choice="both_bad"]', "#submit", "#skip"):
                assert _in_view(page, selector), selector
            page.screenshot(path=str(shots / "label-page.png"))
            page.keyboard.press("g")
            assert not page.is_visible("#guidelines .md strong")
            page.eval_on_selector(pane, "e => { e.scrollTop = e.scrollHeight; }")
            assert page.eval_on_selector(pane, "e => e.scrollTop") > 0
            assert _in_view(page, "#submit") and _in_view(page, 'button[data-choice="left"]')
            assert page.is_visible(f"{long_side} .answer >> text=Paragraph 79")
            page.screenshot(path=str(shots / "label-long-answer.png"))
            # m shows the markdown source instead
            page.keyboard.press("m")
            assert page.is_visible(f"{md_side} pre.source") and not page.is_visible(f"{md_side} .md")
            assert "**here**" in page.inner_text(f"{md_side} pre.source")
            browser.close()
    finally:
        server.stop()


@pytest.mark.slow
def test_skip_back_and_undo_restore_the_earlier_choice_in_a_real_browser(tmp_path):
    from playwright.sync_api import sync_playwright

    store = _store(tmp_path, n=3)
    token = store.add_annotator("kb")
    me, _ = store.annotator_for(token)
    store.close()
    server = Server(tmp_path / "labels.db")

    def on(page, attr, value):
        return page.eval_on_selector(f'button[data-{attr}="{value}"]', "e => e.classList.contains('on')")

    try:
        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(server.url(f"/label?token={token}"))
            assert page.input_value("#item") == "i0" and page.is_disabled("#back")
            page.keyboard.press("1")
            page.keyboard.press("w")
            page.keyboard.press("r")
            page.keyboard.type("because")
            page.keyboard.press("Escape")
            with page.expect_navigation():
                page.keyboard.press("Enter")
            assert page.input_value("#item") == "i1"
            with page.expect_navigation():
                page.keyboard.press("s")  # skip i1
            assert page.input_value("#item") == "i2" and "1 skipped" in page.inner_text("#progress")
            with page.expect_navigation():
                page.keyboard.press("b")  # back to i0: its label shown, changeable
            assert page.input_value("#item") == "i0" and page.is_visible("#revisit")
            assert on(page, "choice", "left") and on(page, "strength", 2)
            assert page.input_value("#rationale") == "because"
            page.keyboard.press("2")
            with page.expect_navigation():
                page.keyboard.press("Enter")  # replaced; forward: the next unlabelled item
            assert page.input_value("#item") == "i2" and not page.is_visible("#revisit")
            page.keyboard.press("3")
            with page.expect_navigation():
                page.keyboard.press("Enter")
            assert page.input_value("#item") == "i1"  # the skipped item, back at the end
            with page.expect_navigation():
                page.keyboard.press("u")  # undo i2's tie: i2 comes back with the tie chosen
            assert page.input_value("#item") == "i2" and on(page, "choice", "tie")
            with page.expect_navigation():
                page.keyboard.press("Enter")
            assert page.input_value("#item") == "i1"
            page.keyboard.press("4")
            with page.expect_navigation():
                page.keyboard.press("Enter")
            assert page.is_visible("#done") and "3 / 3 labelled" in page.inner_text("#progress")
            with page.expect_navigation():
                page.keyboard.press("b")  # back from the end: the last label
            assert page.input_value("#item") == "i1" and on(page, "choice", "both_bad")
            browser.close()
    finally:
        server.stop()
    store = Store(tmp_path / "labels.db")
    got = {x["item_id"]: (x["choice"], x["strength"], x["rationale"]) for x in store.labels()}
    assert got == {"i0": ("right", 2, "because"), "i2": ("tie", None, None), "i1": ("both_bad", None, None)}


@pytest.mark.slow
def test_thumbs_labels_round_trip_to_an_unpaired_export_in_a_real_browser(tmp_path):
    """align label init --responses -> good / bad with a reason by keyboard in a browser, a second annotator over
    HTTP -> align label stats (agreement) and export: TRL's unpaired rows (prompt, completion, label)."""
    from playwright.sync_api import sync_playwright

    from helpers import run_cli

    db = tmp_path / "thumbs.db"
    run_cli(["label", "init", str(db), "--responses", str(_responses(tmp_path))]).check()
    tokens = {who: run_cli(["label", "annotator", str(db), who]).check().output.strip().splitlines()[-1]
              .split("token=")[1] for who in ("alice", "bob")}
    want = {"r1": "good", "r2": "bad", "r3": "good", "r4": "bad"}
    server = Server(db)
    try:
        with sync_playwright() as p:
            browser = _browser(p)
            page = browser.new_page(viewport={"width": 1280, "height": 720})
            page.goto(server.url(f"/label?token={tokens['alice']}"))
            assert page.inner_text("#question") == "Is this answer good?"
            assert page.query_selector("#left") is None and page.is_visible("#answer")
            # a conversation prompt shows as turns, each under its role
            assert (page.eval_on_selector_all("#prompt .turn .role", "els => els.map(e => e.innerText.toLowerCase())")
                    == ["system", "user"])
            assert page.inner_text("#answer .md strong") == "4"  # markdown rendered
            for n in range(4):
                item = page.input_value("#item")
                page.keyboard.press("1" if want[item] == "good" else "2")
                if item == "r2":
                    page.keyboard.press("r")
                    page.keyboard.type("Paris, not Lyon")
                    page.keyboard.press("Escape")
                if n == 0:
                    assert page.eval_on_selector('button[data-choice="good"]', "e => e.classList.contains('on')")
                    page.screenshot(path=str(shots_dir(tmp_path) / "label-thumbs.png"))
                with page.expect_navigation():
                    page.keyboard.press("Enter")
            assert page.is_visible("#done") and page.evaluate("window.__xss") is None
            browser.close()
        status, nxt = server.request("GET", f"/api/next?token={tokens['bob']}")
        assert nxt["item"]["kind"] == "single" and "answer" in nxt and "right" not in nxt
        headers = {"X-Annotator-Token": tokens["bob"], "X-CSRF-Token": nxt["csrf"]}
        while nxt["item"] is not None:
            vote = "good" if nxt["item"]["id"] in ("r1", "r2") else want[nxt["item"]["id"]]  # disagrees on r2
            assert server.request("POST", "/api/label", {"item_id": nxt["item"]["id"], "choice": vote}, headers)[0] == 200
            nxt = server.request("GET", f"/api/next?token={tokens['bob']}")[1]
    finally:
        server.stop()
    out = run_cli(["label", "stats", str(db)]).check().output
    thumbs = json.loads(out[out.index("{"):])["thumbs"]
    assert thumbs["votes"] == {"good": 5, "bad": 3} and thumbs["pairwise_agreement"] == 0.75
    run_cli(["label", "export", str(db), "--out", str(tmp_path / "kto.jsonl")]).check()
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "kto.jsonl").read_text().splitlines())}
    assert set(rows) == {"r1", "r3", "r4"}  # r2: one good, one bad: no majority
    assert rows["r1"]["label"] is True and rows["r4"]["label"] is False and rows["r3"]["label"] is True
    assert rows["r1"]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert rows["r3"]["prompt"] == [{"role": "user", "content": "Say hi"}]
    assert rows["r3"]["completion"] == [{"role": "assistant", "content": "hi"}] and rows["r4"]["completion"] == MARKDOWN
    store = Store(db)
    assert [x["rationale"] for x in store.labels() if x["item_id"] == "r2" and x["annotator"] == "alice"] == (
        ["Paris, not Lyon"])
