"""`align label serve`: the labelling page and its JSON API (Starlette on uvicorn, Jinja2, no build step).

GET  /label?token=T[&item=ID]  the page: the prompt and two responses side by side (sides randomised per
                          annotator and recorded), or one answer to judge good or bad (a thumbs store);
                          choices by button or key, strength, rationale / reason, skip, back and forward over
                          the items already labelled (a label can be changed), undo that restores the choice
GET  /api/next?token=T    the next item as JSON (scripted annotators)
GET  /api/labels?token=T  this annotator's own labels, nobody else's
POST /api/label           {item_id, choice, strength?, rationale?, replace?}; headers X-Annotator-Token, X-CSRF-Token
POST /api/skip            {item_id}: the item comes back after the others
POST /api/undo            removes this annotator's last label (the item comes back with that choice as a draft)

Prompts, answers and the guidelines are markdown, rendered on the server by markdown-it-py with raw HTML
disabled (tags show as text; images are not fetched; javascript: links are refused); every other text is
escaped by Jinja2's autoescape. The script never inserts HTML. Each answer scrolls in its own pane; the
choices stay on screen. A state-changing request needs the annotator's token and the CSRF token the page
carries (an HMAC of the annotator id with a secret kept in the store). Bodies over MAX_BODY bytes get 413; an
unknown item 404; a second label of one item 409 (unless it replaces the annotator's own, going back); each
label is committed before the answer.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets
import socket
from html import escape

from alignment.collect.label.store import Store, StoreError

MAX_BODY = 16 * 1024
MAX_RATIONALE = 4000

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>align label</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="csrf" content="{{ csrf }}">
<style>
*{box-sizing:border-box}html,body{height:100%;margin:0}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;color:#1f2328;background:#f5f6f8;display:flex;
flex-direction:column;overflow:hidden}
header{flex:none;display:flex;align-items:center;gap:14px;padding:8px 18px;background:#fff;border-bottom:1px solid #dde1e6}
header .who{font-weight:600}.progress{color:#57606a}.bar{width:200px;height:6px;background:#e6e9ed;border-radius:3px;
overflow:hidden}.bar span{display:block;height:100%;background:#2f6fde}header .spacer{flex:1}
main{flex:1;min-height:0;display:flex;flex-direction:column;gap:10px;padding:10px 18px;width:100%;max-width:1500px;
margin:0 auto}
#guidelines{flex:none;background:#fffbea;border:1px solid #eed888;border-radius:8px;padding:4px 14px;max-height:32vh;
overflow:auto}#guidelines summary{cursor:pointer;font-weight:600;padding:2px 0}
h2#question,h2#done{font-size:17px;margin:0;flex:none}.note{color:#57606a;margin:0;font-size:13px;flex:none}
.revisit{flex:none;background:#ddf4ff;border:1px solid #a5d6ff;border-radius:6px;padding:4px 10px;font-size:13px}
.prompt{flex:none;max-height:24vh;overflow:auto;background:#fff;border:1px solid #dde1e6;border-radius:8px;
padding:2px 14px}.prompt .label{font-size:11px;text-transform:uppercase;color:#57606a;letter-spacing:.04em;margin-top:6px}
.pair{flex:1;min-height:0;display:flex;gap:12px}
.side{flex:1;min-width:0;display:flex;flex-direction:column;background:#fff;border:1px solid #dde1e6;border-radius:8px}
.side h3{flex:none;margin:0;padding:6px 14px;border-bottom:1px solid #eef0f2;font-size:14px}
.answer{flex:1;min-height:0;overflow:auto;padding:0 14px}
.md pre{background:#f3f4f6;padding:8px 10px;border-radius:6px;overflow:auto}
.md code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace;font-size:13px;
background:#f3f4f6;padding:0 3px;border-radius:3px}.md pre code{padding:0;background:none}
.md table{border-collapse:collapse;margin:8px 0}.md td,.md th{border:1px solid #d0d7de;padding:3px 9px}
.md th{background:#f6f8fa}.md blockquote{border-left:3px solid #d0d7de;margin:0;padding-left:10px;color:#57606a}
.md .img{color:#57606a;font-style:italic}#guidelines .md h1{font-size:18px}#guidelines .md h2{font-size:16px}
.turn .role{font-size:11px;text-transform:uppercase;color:#57606a;letter-spacing:.04em;margin-top:6px}
.turn.role-system{color:#57606a}
pre.source{white-space:pre-wrap;word-break:break-word;font:13px ui-monospace,"DejaVu Sans Mono",monospace;margin:8px 0}
body.show-source .md{display:none}body:not(.show-source) pre.source{display:none}
footer{flex:none;background:#fff;border-top:1px solid #dde1e6;padding:8px 18px;box-shadow:0 -2px 8px rgba(0,0,0,.05)}
.row{display:flex;flex-wrap:wrap;align-items:center;gap:6px;max-width:1500px;margin:0 auto 4px}
button{font:inherit;font-size:14px;padding:5px 11px;border:1px solid #c4c9d0;border-radius:6px;background:#fff;
cursor:pointer;color:inherit}button:hover{border-color:#8c959f}button:disabled{opacity:.45;cursor:default}
button.on{background:#2f6fde;color:#fff;border-color:#2f6fde}button.good.on{background:#1a7f37;border-color:#1a7f37}
button.bad.on{background:#cf222e;border-color:#cf222e}button.primary{background:#1f2328;color:#fff;border-color:#1f2328}
kbd{border:1px solid #aaa;border-bottom-width:2px;border-radius:3px;padding:0 4px;font-size:11px;margin-left:3px;
font-family:inherit}button.on kbd,button.primary kbd{border-color:rgba(255,255,255,.6)}
#rationale{flex:1;min-width:220px;font:inherit;font-size:14px;padding:5px 8px;border:1px solid #c4c9d0;border-radius:6px;
resize:vertical}.sep{width:1px;align-self:stretch;background:#dde1e6;margin:0 4px}#status{color:#b42318}
</style></head><body>
<header><span class="progress" id="progress">{{ done }} / {{ total }} labelled{% if skipped %} &middot; {{ skipped }} skipped (they come back at the end){% endif %}{% if name %} &middot; {{ name }}{% endif %}</span>
<span class="bar"><span style="width:{{ (100 * done / total) | round(1) if total else 0 }}%"></span></span>
<span class="spacer"></span>
{% if guidelines %}<button id="toggle-guidelines" type="button">Guidelines <kbd>g</kbd></button>{% endif %}
<button id="toggle-source" type="button">Source <kbd>m</kbd></button></header>
<main>
{% if guidelines %}<details id="guidelines"{% if done == 0 %} open{% endif %}><summary>Guidelines</summary>
<div class="md">{{ guidelines_html | safe }}</div><pre class="source">{{ guidelines }}</pre></details>{% endif %}
{% if item %}
{% if revisit %}<div class="revisit" id="revisit">You labelled this item before: change your answer and submit, or go
back and forward with <kbd>b</kbd> <kbd>f</kbd>.</div>{% endif %}
{% if item.single %}<h2 id="question">Is this answer good?</h2>
{% elif item.arena %}<h2 id="question">Arena: two policies answered this prompt. Which answer is better?</h2>
<p class="note">The policies' names are hidden, and which side each is on changes from item to item.</p>
{% else %}<h2 id="question">Which response is better?</h2>{% endif %}
<section class="prompt" id="prompt-pane">{% if not prompt_turns %}<div class="label">Prompt</div>{% endif %}<div class="md" id="prompt">{{ prompt_html | safe }}</div>
<pre class="source">{{ item.prompt }}</pre></section>
{% if item.single %}
<div class="pair"><div class="side" id="answer"><h3>Answer</h3><div class="answer"><div class="md">{{ left_html | safe }}</div>
<pre class="source">{{ left }}</pre></div></div></div>
{% else %}
<div class="pair">
  <div class="side" id="left"><h3>A <kbd>1</kbd></h3><div class="answer"><div class="md">{{ left_html | safe }}</div>
  <pre class="source">{{ left }}</pre></div></div>
  <div class="side" id="right"><h3>B <kbd>2</kbd></h3><div class="answer"><div class="md">{{ right_html | safe }}</div>
  <pre class="source">{{ right }}</pre></div></div>
</div>
{% endif %}
<form hidden><input id="item" value="{{ item.id }}"></form>
{% else %}
<h2 id="done">All items labelled. Thank you.</h2>
<p class="note">Go back to change a label, or undo the last one.</p>
{% endif %}
</main>
<footer id="controls">
{% if item %}
<div class="row" id="choices">
{% if item.single %}
  <button data-choice="good" class="good">&#10003; Good <kbd>1</kbd></button>
  <button data-choice="bad" class="bad">&#10007; Bad <kbd>2</kbd></button>
{% else %}
  <button data-choice="left">A is better <kbd>1</kbd></button>
  <button data-choice="right">B is better <kbd>2</kbd></button>
  <button data-choice="tie">Tie <kbd>3</kbd></button>
  <button data-choice="both_bad">Both bad <kbd>4</kbd></button>
  <span class="sep"></span><span id="strengths">strength:
  <button data-strength="1">slightly <kbd>q</kbd></button>
  <button data-strength="2">clearly <kbd>w</kbd></button>
  <button data-strength="3">much better <kbd>e</kbd></button></span>
{% endif %}
</div>
<div class="row">
  <textarea id="rationale" rows="1" placeholder="{{ 'reason' if item.single else 'rationale' }} (optional; r to type, Esc to leave)">{{ initial.rationale or '' }}</textarea>
  <button id="submit" class="primary">Submit <kbd>Enter</kbd></button>
  {% if not revisit %}<button id="skip">Skip <kbd>s</kbd></button>{% endif %}
  <button id="back"{% if not back %} disabled{% endif %}>Back <kbd>b</kbd></button>
  {% if revisit %}<button id="forward">Forward <kbd>f</kbd></button>{% endif %}
  <button id="undo">Undo last <kbd>u</kbd></button>
  <span id="status"></span>
</div>
{% else %}
<div class="row"><button id="back"{% if not back %} disabled{% endif %}>Back <kbd>b</kbd></button>
<button id="undo">Undo last <kbd>u</kbd></button> <span id="status"></span></div>
{% endif %}
<form hidden><input id="nav" data-back="{{ back or '' }}" data-forward="{{ forward or '' }}"
  data-revisit="{{ 1 if revisit else 0 }}" data-choice="{{ initial.choice or '' }}" data-strength="{{ initial.strength or '' }}"></form>
</footer>
<script>
const token = new URLSearchParams(location.search).get("token");
const csrf = document.querySelector('meta[name=csrf]').content;
const nav = document.getElementById("nav").dataset;
const home = "/label?token=" + encodeURIComponent(token);
const itemEl = document.getElementById("item");
let choice = null, strength = null, busy = false;
function $(id) { return document.getElementById(id); }
function say(text) { $("status").textContent = text; }
function mark(attr, value) {
  document.querySelectorAll("[data-" + attr + "]").forEach(b => {
    if (b.tagName === "BUTTON") b.classList.toggle("on", b.dataset[attr] === String(value)); });
}
function pick(c) {
  if (!document.querySelector('button[data-choice="' + c + '"]')) return;
  choice = c; if (c !== "left" && c !== "right") { strength = null; mark("strength", null); } mark("choice", c);
}
function pickStrength(s) { if (choice === "left" || choice === "right") { strength = s; mark("strength", s); } }
function go(itemId) { location.href = itemId ? home + "&item=" + encodeURIComponent(itemId) : home; }
async function post(path, body) {
  if (busy) return false;  // one request at a time: a held key must not undo several labels
  busy = true;
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json",
    "X-Annotator-Token": token, "X-CSRF-Token": csrf}, body: JSON.stringify(body || {})});
  if (!r.ok) { busy = false; say((await r.json()).error); return false; }
  return true;  // the page changes; busy stays set until then
}
async function submit() {
  if (!choice) {
    say(document.querySelector('button[data-choice="good"]') ? "pick good or bad first (1-2)" : "pick a choice first (1-4)");
    return;
  }
  const rationale = $("rationale").value || null;
  const revisit = nav.revisit === "1";
  if (await post("/api/label", {item_id: itemEl.value, choice, strength, rationale, replace: revisit})) {
    if (revisit) go(nav.forward); else location.reload();
  }
}
async function skip() { if (itemEl && nav.revisit !== "1" && await post("/api/skip", {item_id: itemEl.value})) go(""); }
async function undo() { if (await post("/api/undo")) go(""); }
function back() { if (nav.back) go(nav.back); }
function forward() { if (nav.revisit === "1") go(nav.forward); }
function toggleGuidelines() { const g = $("guidelines"); if (g) g.open = !g.open; }
function toggleSource() { document.body.classList.toggle("show-source"); }
document.querySelectorAll("button[data-choice]").forEach(b => b.onclick = () => pick(b.dataset.choice));
document.querySelectorAll("button[data-strength]").forEach(b => b.onclick = () => pickStrength(Number(b.dataset.strength)));
const handlers = {submit, skip, undo, back, forward};
for (const [id, fn] of Object.entries(handlers)) if ($(id)) $(id).onclick = fn;
if ($("toggle-guidelines")) $("toggle-guidelines").onclick = toggleGuidelines;
$("toggle-source").onclick = toggleSource;
if (nav.choice) pick(nav.choice);  // the earlier choice: going back, or after an undo
if (nav.strength) pickStrength(Number(nav.strength));
document.addEventListener("keydown", e => {
  if (e.repeat || e.ctrlKey || e.metaKey || e.altKey) return;
  const typing = document.activeElement && document.activeElement.id === "rationale";
  if (typing) { if (e.key === "Escape") document.activeElement.blur();
                else if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); submit(); } return; }
  const single = !!document.querySelector('button[data-choice="good"]');
  const keys = single ? {"1": "good", "2": "bad"} : {"1": "left", "2": "right", "3": "tie", "4": "both_bad"};
  const strengths = {"q": 1, "w": 2, "e": 3};
  if (keys[e.key] && itemEl) pick(keys[e.key]);
  else if (strengths[e.key]) pickStrength(strengths[e.key]);
  else if (e.key === "Enter" && itemEl) { e.preventDefault(); submit(); }
  else if (e.key === "u") undo();
  else if (e.key === "s") skip();
  else if (e.key === "b") back();
  else if (e.key === "f") forward();
  else if (e.key === "g") toggleGuidelines();
  else if (e.key === "m") toggleSource();
  else if (e.key === "r" && $("rationale")) { e.preventDefault(); $("rationale").focus(); }
});
</script></body></html>
"""


def markdown_renderer():
    """markdown-it-py, CommonMark with tables and strikethrough; raw HTML off (tags are shown as text), images
    shown as their alt text and address (never fetched), links opened in a new tab without a referrer."""
    from markdown_it import MarkdownIt
    from markdown_it.common.utils import escapeHtml

    md = MarkdownIt("commonmark", {"html": False, "breaks": True, "linkify": False, "typographer": False})
    md.enable(["table", "strikethrough"])

    def image(self, tokens, idx, options, env):
        token = tokens[idx]
        alt = self.renderInlineAsText(token.children or [], options, env)
        return f'<span class="img">[image: {escapeHtml(alt)} {escapeHtml(str(token.attrGet("src") or ""))}]</span>'

    def link_open(self, tokens, idx, options, env):
        tokens[idx].attrSet("target", "_blank")
        tokens[idx].attrSet("rel", "noopener noreferrer nofollow")
        return self.renderToken(tokens, idx, options, env)

    md.add_render_rule("image", image)
    md.add_render_rule("link_open", link_open)
    return md


def _text(content) -> str:
    if isinstance(content, list):  # multimodal parts: their text
        return "".join(str(p.get("text", "")) if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def public_url(host: str, port: int) -> str:
    """The address annotators open: a wildcard bind (0.0.0.0, ::) is reached through this machine's name."""
    if host in ("0.0.0.0", "::", ""):
        host = socket.getfqdn() or socket.gethostname()
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"http://{host}:{port}"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def make_app(store_path: str):
    from jinja2 import Environment
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse
    from starlette.routing import Route

    store = Store(store_path)
    secret_row = store.db.execute("SELECT value FROM meta WHERE key = 'csrf_secret'").fetchone()
    if secret_row is None:
        store.db.execute("INSERT OR IGNORE INTO meta VALUES ('csrf_secret', ?)", (secrets.token_hex(32),))
        secret_row = store.db.execute("SELECT value FROM meta WHERE key = 'csrf_secret'").fetchone()
    secret = secret_row[0].encode()
    page = Environment(autoescape=True).from_string(PAGE)
    md = markdown_renderer()

    def csrf_for(annotator_id: str) -> str:
        return hmac.new(secret, annotator_id.encode(), hashlib.sha256).hexdigest()

    def error(exc: StoreError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    def item_view(annotator_id: str, item_id: str | None = None) -> dict:
        """The item to show (the next one, or `item_id`: going back), its sides, the label or draft to preselect,
        and where back and forward lead (the items this annotator labelled, in order)."""
        done, total = store.progress(annotator_id)
        history = store.history(annotator_id)
        view = {"done": done, "total": total, "skipped": store.skipped(annotator_id), "item": None, "revisit": False,
                "back": history[-1] if history else None, "forward": None, "initial": {}}
        if item_id is not None:
            item, left_side = store.assigned_item(annotator_id, item_id)
        else:
            nxt = store.next_item(annotator_id)
            if nxt is None:
                return view
            item, left_side = nxt
        label = store.label_of(annotator_id, item.id)
        if label is not None:  # going back to an item already labelled: its label, changeable
            at = history.index(item.id)
            view.update(revisit=True, back=history[at - 1] if at > 0 else None,
                        forward=history[at + 1] if at + 1 < len(history) else None)
        view["initial"] = label or store.draft(annotator_id, item.id) or {}
        left, right = (item.a, item.b) if left_side == "a" else (item.b, item.a)
        view.update(item={"id": item.id, "prompt": item.prompt, "arena": "arena" in item.meta, "kind": item.kind,
                          "single": item.kind == "single", "raw_prompt": (item.meta.get("raw") or {}).get("prompt")},
                    left=left, right=right)
        return view

    def rendered(view: dict) -> dict:
        guidelines = store.guidelines()
        extra = {"guidelines": guidelines, "guidelines_html": md.render(guidelines) if guidelines else ""}
        if view["item"]:
            raw = view["item"].pop("raw_prompt", None)
            turns = isinstance(raw, list) and all(isinstance(m, dict) and "content" in m for m in raw) and len(raw) > 1
            if turns:  # a conversation: each turn under its role, each rendered as markdown
                prompt_html = "".join(
                    f'<div class="turn role-{escape(str(m.get("role", "")))}"><div class="role">'
                    f'{escape(str(m.get("role", "")))}</div>{md.render(_text(m["content"]))}</div>' for m in raw)
            else:
                prompt_html = md.render(view["item"]["prompt"])
            extra.update(prompt_html=prompt_html, prompt_turns=turns, left_html=md.render(view["left"]),
                         right_html=md.render(view["right"]))
        return {**view, **extra}

    async def label_page(request: Request):
        try:
            annotator_id, name = store.annotator_for(request.query_params.get("token"))
            view = item_view(annotator_id, request.query_params.get("item"))
        except StoreError as exc:
            message = "sign in with your personal link" if exc.status == 401 else str(exc)
            return HTMLResponse(Environment(autoescape=True).from_string("<p>{{ s }}: {{ m }}</p>").render(
                s=exc.status, m=message), status_code=exc.status)
        html = page.render(csrf=csrf_for(annotator_id), name=name, **rendered(view))
        return HTMLResponse(html, headers={"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'; img-src 'none'",
                                           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store",
                                           "Referrer-Policy": "no-referrer"})

    async def api_next(request: Request):
        try:
            annotator_id, _ = store.annotator_for(request.query_params.get("token"))
        except StoreError as exc:
            return error(exc)
        view = item_view(annotator_id)
        if view["item"]:
            view["item"].pop("raw_prompt", None)
        if view["item"] and view["item"]["single"]:
            view["answer"] = view.pop("left")
            view.pop("right")
        return JSONResponse({**view, "draft": view.pop("initial") or None, "csrf": csrf_for(annotator_id)})

    async def api_labels(request: Request):
        try:
            annotator_id, _ = store.annotator_for(request.query_params.get("token"))
        except StoreError as exc:
            return error(exc)
        return JSONResponse({"labels": store.labels(annotator_id)})

    async def authorised_body(request: Request) -> tuple[str, dict]:
        length = request.headers.get("content-length")
        if length is not None and int(length) > MAX_BODY:
            raise StoreError(f"request body over {MAX_BODY} bytes", 413)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                raise StoreError(f"request body over {MAX_BODY} bytes", 413)
        annotator_id, _ = store.annotator_for(request.headers.get("x-annotator-token"))
        if not hmac.compare_digest(request.headers.get("x-csrf-token", ""), csrf_for(annotator_id)):
            raise StoreError("missing or wrong CSRF token", 403)
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise StoreError("the body is not JSON", 400) from None
        if not isinstance(data, dict):
            raise StoreError("the body must be a JSON object", 400)
        return annotator_id, data

    async def api_label(request: Request):
        try:
            annotator_id, data = await authorised_body(request)
            item_id, choice = data.get("item_id"), data.get("choice")
            if not isinstance(item_id, str) or not isinstance(choice, str):
                raise StoreError("item_id and choice are required strings", 422)
            rationale = data.get("rationale")
            if rationale is not None and (not isinstance(rationale, str) or len(rationale) > MAX_RATIONALE):
                raise StoreError(f"rationale must be a string of at most {MAX_RATIONALE} characters", 422)
            strength = data.get("strength")
            if strength is not None and (not isinstance(strength, int) or isinstance(strength, bool)):
                raise StoreError("strength must be 1, 2 or 3", 422)
            replace = data.get("replace", False)
            if not isinstance(replace, bool):
                raise StoreError("replace must be true or false", 422)
            label_id = store.add_label(annotator_id, item_id, choice, strength, rationale, replace=replace)
        except StoreError as exc:
            return error(exc)
        return JSONResponse({"ok": True, "label_id": label_id})  # committed: synchronous=FULL, autocommit

    async def api_skip(request: Request):
        try:
            annotator_id, data = await authorised_body(request)
            item_id = data.get("item_id")
            if not isinstance(item_id, str):
                raise StoreError("item_id is a required string", 422)
            store.skip(annotator_id, item_id)
        except StoreError as exc:
            return error(exc)
        return JSONResponse({"ok": True})

    async def api_undo(request: Request):
        try:
            annotator_id, _ = await authorised_body(request)
        except StoreError as exc:
            return error(exc)
        return JSONResponse({"ok": True, "undone": store.undo_last(annotator_id)})

    routes = [Route("/label", label_page), Route("/api/next", api_next), Route("/api/labels", api_labels),
              Route("/api/label", api_label, methods=["POST"]), Route("/api/skip", api_skip, methods=["POST"]),
              Route("/api/undo", api_undo, methods=["POST"])]
    return Starlette(routes=routes)


def annotator_lines(store: Store, url: str) -> list[str]:
    """One line per annotator: name, progress and where their page is (the token is the one `align label annotator`
    printed; the store keeps only its hash)."""
    lines = []
    for annotator_id, name in store.annotators():
        done, total = store.progress(annotator_id)
        lines.append(f"  {name}: {done}/{total} labelled  {url}/label?token=<{name}'s token>")
    return lines


def serve(store_path: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    import uvicorn

    app = make_app(store_path)
    store = Store(store_path)
    url = public_url(host, port)
    store.set_meta("server_url", url)  # `align label annotator` prints links to this address from now on
    print(f"align label: serving {store_path} at {url}/label (Ctrl-C stops)", flush=True)
    names = annotator_lines(store, url)
    if names:
        print("annotators (each opens the personal link `align label annotator` printed; "
              "`align label annotator STORE NAME --reissue` makes a new one):", flush=True)
        for line in names:
            print(line, flush=True)
    else:
        print(f"no annotators yet: align label annotator {store_path} NAME", flush=True)
    store.close()
    if not is_loopback(host):
        # Tokens are always required; say so, since this exposes the page beyond this machine.
        print(f"warning: serving on {host}: every request needs an annotator's token (no anonymous access)", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
