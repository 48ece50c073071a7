"""`align label serve`: the labelling page and its JSON API (Starlette on uvicorn, Jinja2, no build step).

GET  /label?token=T       the page: the prompt and two responses side by side (sides randomised per
                          annotator and recorded), choices by button or key, strength, rationale, undo
GET  /api/next?token=T    the next item as JSON (scripted annotators)
GET  /api/labels?token=T  this annotator's own labels, nobody else's
POST /api/label           {item_id, choice, strength?, rationale?}; headers X-Annotator-Token, X-CSRF-Token
POST /api/undo            removes this annotator's last label

Every text is escaped by Jinja2's autoescape and written into the page by the server; the script never
inserts HTML. A state-changing request needs the annotator's token and the CSRF token the page carries
(an HMAC of the annotator id with a secret kept in the store). Bodies over MAX_BODY bytes get 413; an
unknown item 404; a second label of one item 409; each label is committed before the answer.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import secrets

from alignment.collect.label.store import Store, StoreError

MAX_BODY = 16 * 1024
MAX_RATIONALE = 4000

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>align label</title>
<meta name="csrf" content="{{ csrf }}">
<style>
body{font-family:system-ui,sans-serif;margin:20px;max-width:1300px;color:#222}
.prompt{background:#f4f4f4;padding:10px;border-radius:6px;white-space:pre-wrap}
.pair{display:flex;gap:16px;margin:14px 0}.side{flex:1;border:1px solid #ccc;border-radius:6px;padding:10px}
.side pre{white-space:pre-wrap;font-family:inherit;margin:0}.side h3{margin:0 0 6px 0}
button{margin:3px;padding:6px 10px}button.on{background:#2b6cb0;color:#fff}kbd{border:1px solid #aaa;
border-radius:3px;padding:0 4px;font-size:12px}#status{color:#a00}.progress{color:#555}
</style></head><body>
<div class="progress" id="progress">{{ done }} / {{ total }} labelled{% if name %} &middot; {{ name }}{% endif %}</div>
{% if item %}
{% if item.arena %}<h2 id="question">Arena: two policies answered this prompt. Which answer is better?</h2>
<p class="progress">The policies' names are hidden, and which side each is on changes from item to item.</p>
{% else %}<h2 id="question">Which response is better?</h2>{% endif %}
<div class="prompt" id="prompt">{{ item.prompt }}</div>
<div class="pair">
  <div class="side" id="left"><h3>A <kbd>1</kbd></h3><pre>{{ left }}</pre></div>
  <div class="side" id="right"><h3>B <kbd>2</kbd></h3><pre>{{ right }}</pre></div>
</div>
<div id="choices">
  <button data-choice="left">A is better <kbd>1</kbd></button>
  <button data-choice="right">B is better <kbd>2</kbd></button>
  <button data-choice="tie">Tie <kbd>3</kbd></button>
  <button data-choice="both_bad">Both bad <kbd>4</kbd></button>
</div>
<div id="strengths">strength (optional):
  <button data-strength="1">slightly <kbd>q</kbd></button>
  <button data-strength="2">clearly <kbd>w</kbd></button>
  <button data-strength="3">much better <kbd>e</kbd></button>
</div>
<p><textarea id="rationale" rows="2" cols="80" placeholder="rationale (optional; r to type, Esc to leave)"></textarea></p>
<p><button id="submit">Submit <kbd>Enter</kbd></button> <button id="undo">Undo last <kbd>u</kbd></button>
<span id="status"></span></p>
<form hidden><input id="item" value="{{ item.id }}"></form>
{% else %}
<h2 id="done">All items labelled. Thank you.</h2>
<p><button id="undo">Undo last <kbd>u</kbd></button> <span id="status"></span></p>
{% endif %}
<script>
const token = new URLSearchParams(location.search).get("token");
const csrf = document.querySelector('meta[name=csrf]').content;
let choice = null, strength = null, busy = false;
function mark(attr, value) {
  document.querySelectorAll("[data-" + attr + "]").forEach(b => b.classList.toggle("on", b.dataset[attr] === String(value)));
}
function pick(c) { choice = c; if (c === "tie" || c === "both_bad") { strength = null; mark("strength", null); } mark("choice", c); }
function pickStrength(s) { if (choice === "left" || choice === "right") { strength = s; mark("strength", s); } }
async function post(path, body) {
  if (busy) return false;  // one request at a time: a held key must not undo several labels
  busy = true;
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json",
    "X-Annotator-Token": token, "X-CSRF-Token": csrf}, body: JSON.stringify(body || {})});
  if (!r.ok) { busy = false; document.getElementById("status").textContent = (await r.json()).error; return false; }
  return true;  // the page reloads; busy stays set until then
}
async function submit() {
  if (!choice) { document.getElementById("status").textContent = "pick a choice first (1-4)"; return; }
  const rationale = document.getElementById("rationale").value || null;
  if (await post("/api/label", {item_id: document.getElementById("item").value, choice, strength, rationale})) location.reload();
}
async function undo() { if (await post("/api/undo")) location.reload(); }
document.querySelectorAll("[data-choice]").forEach(b => b.onclick = () => pick(b.dataset.choice));
document.querySelectorAll("[data-strength]").forEach(b => b.onclick = () => pickStrength(Number(b.dataset.strength)));
if (document.getElementById("submit")) document.getElementById("submit").onclick = submit;
document.getElementById("undo").onclick = undo;
document.addEventListener("keydown", e => {
  if (e.repeat) return;
  const typing = document.activeElement && document.activeElement.id === "rationale";
  if (typing) { if (e.key === "Escape") document.activeElement.blur(); return; }
  const keys = {"1": "left", "2": "right", "3": "tie", "4": "both_bad"};
  const strengths = {"q": 1, "w": 2, "e": 3};
  if (keys[e.key] && document.getElementById("item")) pick(keys[e.key]);
  else if (strengths[e.key]) pickStrength(strengths[e.key]);
  else if (e.key === "Enter" && document.getElementById("item")) { e.preventDefault(); submit(); }
  else if (e.key === "u") undo();
  else if (e.key === "r" && document.getElementById("rationale")) { e.preventDefault(); document.getElementById("rationale").focus(); }
});
</script></body></html>
"""


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

    def csrf_for(annotator_id: str) -> str:
        return hmac.new(secret, annotator_id.encode(), hashlib.sha256).hexdigest()

    def error(exc: StoreError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    def item_view(annotator_id: str) -> dict:
        done, total = store.progress(annotator_id)
        nxt = store.next_item(annotator_id)
        if nxt is None:
            return {"done": done, "total": total, "item": None}
        item, left_side = nxt
        left, right = (item.a, item.b) if left_side == "a" else (item.b, item.a)
        return {"done": done, "total": total,
                "item": {"id": item.id, "prompt": item.prompt, "arena": "arena" in item.meta}, "left": left,
                "right": right}

    async def label_page(request: Request):
        try:
            annotator_id, name = store.annotator_for(request.query_params.get("token"))
        except StoreError as exc:
            return HTMLResponse(f"<p>{exc.status}: sign in with your personal link</p>", status_code=exc.status)
        view = item_view(annotator_id)
        html = page.render(csrf=csrf_for(annotator_id), name=name, **view)
        return HTMLResponse(html, headers={"Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; "
                                           "style-src 'unsafe-inline'; connect-src 'self'; img-src 'none'",
                                           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"})

    async def api_next(request: Request):
        try:
            annotator_id, _ = store.annotator_for(request.query_params.get("token"))
        except StoreError as exc:
            return error(exc)
        return JSONResponse({**item_view(annotator_id), "csrf": csrf_for(annotator_id)})

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
            label_id = store.add_label(annotator_id, item_id, choice, strength, rationale)
        except StoreError as exc:
            return error(exc)
        return JSONResponse({"ok": True, "label_id": label_id})  # committed: synchronous=FULL, autocommit

    async def api_undo(request: Request):
        try:
            annotator_id, _ = await authorised_body(request)
        except StoreError as exc:
            return error(exc)
        return JSONResponse({"ok": True, "undone": store.undo_last(annotator_id)})

    routes = [Route("/label", label_page), Route("/api/next", api_next), Route("/api/labels", api_labels),
              Route("/api/label", api_label, methods=["POST"]), Route("/api/undo", api_undo, methods=["POST"])]
    return Starlette(routes=routes)


def serve(store_path: str, host: str = "127.0.0.1", port: int = 8765) -> None:
    import uvicorn

    if not is_loopback(host):
        # Tokens are always required; say so, since this exposes the page beyond this machine.
        print(f"warning: serving on {host}: every request needs an annotator's token (no anonymous access)")
    uvicorn.run(make_app(store_path), host=host, port=port, log_level="warning", access_log=False)
