"""`align label`: agreement math by hand, the store's rules, the live server's refusals, durability under
kill -9, and a keyboard-only session in a real browser (with hostile model output that must run nothing)."""

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
from alignment.collect.label.store import Item, Store, StoreError, preferred_candidate
from helpers import align_cache, child_env, free_port  # noqa: F401

REPO = Path(__file__).resolve().parents[2]
HOSTILE = ['<script>window.__xss = 1</script>', '<img src=x onerror="window.__xss = 2">']


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
