"""`align label`: human feedback over a local web app (preferences between two answers, or thumbs up / down on
one), with agreement statistics and export.

    align label init STORE.db --pairs FILE            items from align pairs output or any preference file
    align label init STORE.db --arena A.jsonl B.jsonl --names A B   two policies' answers to the same prompts
    align label init STORE.db --responses FILE        single answers to judge good or bad (thumbs)
    align label init STORE.db --guidelines GUIDE.md   guidelines shown on the page (with items, or alone to update)
    align label annotator STORE.db NAME [--overlap N] add an annotator; prints their personal URL (token)
    align label annotator STORE.db NAME --reissue     a new link for an existing annotator (the old one stops working)
    align label serve STORE.db [--host 127.0.0.1] [--port 8765]   prints its address and each annotator's progress
    align label stats STORE.db                        counts, time per label, kappa, alpha, AI agreement, arena, thumbs
    align label export STORE.db --out FILE.jsonl      pairs: prompt/chosen/rejected (align rm / dpo); thumbs:
                                                      prompt/completion/label (TRL's unpaired preference rows)

Annotator links follow the address `serve` last listened on (or --host / --port / --url when given).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from alignment.collect.label import results
from alignment.collect.label.server import public_url, serve
from alignment.collect.label.store import Store, StoreError
from alignment.data.sources import DataError

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 8765


def add_parser(sub) -> None:
    label = sub.add_parser("label", help="human feedback labelling: a local web app, agreement, export",
                           description=__doc__.split("\n\n")[0])
    jobs = label.add_subparsers(dest="label_command", required=True, metavar="JOB")
    init = jobs.add_parser("init", help="create a store and load items (and guidelines)")
    init.add_argument("store")
    init.add_argument("--pairs", default=None, help="a preference file (align pairs output, or any our loaders read)")
    init.add_argument("--arena", nargs=2, default=None, metavar=("A", "B"),
                      help="two files of {id?, prompt, response} rows: the same prompts answered by two policies")
    init.add_argument("--names", nargs=2, default=("A", "B"), help="the two policies' names (arena)")
    init.add_argument("--responses", default=None,
                      help="single answers to judge good or bad: rows {id?, prompt, completion} (or response / "
                           "answer, or messages ending with the assistant's turn)")
    init.add_argument("--guidelines", default=None, metavar="FILE",
                      help="labelling guidelines (markdown) shown on the page; alone, updates an existing store's")
    ann = jobs.add_parser("annotator", help="add an annotator and print their personal URL")
    ann.add_argument("store")
    ann.add_argument("name")
    ann.add_argument("--overlap", type=int, default=None,
                     help="assign only items that have fewer than N annotators so far (default: every item)")
    ann.add_argument("--reissue", action="store_true", help="a new link for an existing annotator (the old one stops "
                     "working; their labels stay)")
    ann.add_argument("--host", default=None, help="the server's host (default: where `serve` last listened, else "
                     f"{DEFAULT_HOST})")
    ann.add_argument("--port", type=int, default=None, help=f"the server's port (default: as --host, else {DEFAULT_PORT})")
    ann.add_argument("--url", default=None, help="the address annotators reach the server at (e.g. behind a proxy), "
                     "instead of http://HOST:PORT")
    srv = jobs.add_parser("serve", help="serve the labelling page")
    srv.add_argument("store")
    srv.add_argument("--host", default=DEFAULT_HOST, help="bind address (default loopback only)")
    srv.add_argument("--port", type=int, default=DEFAULT_PORT)
    st = jobs.add_parser("stats", help="agreement and progress as JSON")
    st.add_argument("store")
    ex = jobs.add_parser("export", help="training rows with provenance")
    ex.add_argument("store")
    ex.add_argument("--out", required=True)
    ex.add_argument("--keep-ties", action="store_true", help="keep items whose majority is a tie (not trainable: "
                    "counted, never written as pairs)")
    ex.add_argument("--keep-both-bad", action="store_true")
    ex.add_argument("--min-agreement", type=float, default=0.0, help="drop items whose majority share is below this")


def annotator_url(store: Store, args) -> str:
    """Where an annotator's link points: --url, else --host / --port, else the address `serve` recorded."""
    if args.url:
        return args.url.rstrip("/")
    recorded = store.get_meta("server_url")
    if args.host is None and args.port is None and recorded:
        return recorded
    if recorded and (args.host is None or args.port is None):  # one of them given: the other from the server
        from urllib.parse import urlsplit

        parts = urlsplit(recorded)
        return public_url(args.host or parts.hostname or DEFAULT_HOST, args.port or parts.port or DEFAULT_PORT)
    return public_url(args.host or DEFAULT_HOST, args.port or DEFAULT_PORT)


def main(args) -> int:
    job = args.label_command
    if job != "init" and not Path(args.store).exists():
        print(f"error: no label store at {args.store} (align label init first)", file=sys.stderr)
        return 2
    try:
        if job == "serve":
            serve(args.store, args.host, args.port)
            return 0
        if job == "init":
            return _init(args)
        store = Store(args.store)
        if job == "annotator":
            token = store.reissue(args.name) if args.reissue else store.add_annotator(args.name, args.overlap)
            done, total = store.progress(store.annotator_for(token)[0])
            print(f"annotator {args.name}: {total} items assigned" + (f", {done} labelled; new link" if args.reissue
                                                                      else ""))
            print(f"{annotator_url(store, args)}/label?token={token}")
        elif job == "stats":
            print(json.dumps(results.stats(store), indent=2))
        elif job == "export":
            report = results.export(store, args.out, drop_ties=not args.keep_ties,
                                    drop_both_bad=not args.keep_both_bad, min_agreement=args.min_agreement)
            print(json.dumps(report, indent=2))
    except (StoreError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _init(args) -> int:
    sources = [x for x in (args.pairs, args.arena, args.responses) if x]
    if len(sources) > 1 or (not sources and not args.guidelines):
        print("error: give one of --pairs FILE, --arena A B or --responses FILE (and --guidelines FILE if you like), "
              "or --guidelines FILE alone", file=sys.stderr)
        return 2
    guidelines = None
    if args.guidelines:
        path = Path(args.guidelines)
        if not path.is_file():
            print(f"error: --guidelines {args.guidelines}: no such file", file=sys.stderr)
            return 2
        guidelines = path.read_text()
    if not sources and not Path(args.store).exists():
        print(f"error: no label store at {args.store}: --guidelines alone updates an existing store", file=sys.stderr)
        return 2
    if args.pairs:
        items = results.items_from_pairs(args.pairs)
    elif args.arena:
        items = results.items_from_arena(args.arena[0], args.arena[1], tuple(args.names))
    elif args.responses:
        items = results.items_from_responses(args.responses)
    store = Store(args.store)
    if sources:
        kind = "single answers (thumbs up / down)" if args.responses else "pairs"
        print(f"{store.add_items(items)} items ({kind}) added to {args.store}")
    if guidelines is not None:
        store.set_guidelines(guidelines)
        print(f"guidelines ({len(guidelines.splitlines())} lines) from {args.guidelines} shown on the page")
    return 0
