"""`align label`: human preference labelling over a local web app, with agreement statistics and export.

    align label init STORE.db --pairs FILE            items from align pairs output or any preference file
    align label init STORE.db --arena A.jsonl B.jsonl --names A B   two policies' answers to the same prompts
    align label annotator STORE.db NAME [--overlap N] add an annotator; prints their personal URL (token)
    align label serve STORE.db [--host 127.0.0.1] [--port 8765]
    align label stats STORE.db                        counts, time per label, kappa, alpha, AI agreement, arena
    align label export STORE.db --out pairs.jsonl     prompt/chosen/rejected with provenance, for align rm / dpo
"""

from __future__ import annotations

import json
import sys

from alignment.collect.label import results
from alignment.collect.label.server import serve
from alignment.collect.label.store import Store, StoreError


def add_parser(sub) -> None:
    label = sub.add_parser("label", help="human preference labelling: a local web app, agreement, export",
                           description=__doc__.split("\n\n")[0])
    jobs = label.add_subparsers(dest="label_command", required=True, metavar="JOB")
    init = jobs.add_parser("init", help="create a store and load items")
    init.add_argument("store")
    init.add_argument("--pairs", default=None, help="a preference file (align pairs output, or any our loaders read)")
    init.add_argument("--arena", nargs=2, default=None, metavar=("A", "B"),
                      help="two files of {id?, prompt, response} rows: the same prompts answered by two policies")
    init.add_argument("--names", nargs=2, default=("A", "B"), help="the two policies' names (arena)")
    ann = jobs.add_parser("annotator", help="add an annotator and print their personal URL")
    ann.add_argument("store")
    ann.add_argument("name")
    ann.add_argument("--overlap", type=int, default=None,
                     help="assign only items that have fewer than N annotators so far (default: every item)")
    ann.add_argument("--host", default="127.0.0.1")
    ann.add_argument("--port", type=int, default=8765)
    srv = jobs.add_parser("serve", help="serve the labelling page")
    srv.add_argument("store")
    srv.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    srv.add_argument("--port", type=int, default=8765)
    st = jobs.add_parser("stats", help="agreement and progress as JSON")
    st.add_argument("store")
    ex = jobs.add_parser("export", help="training pairs with provenance")
    ex.add_argument("store")
    ex.add_argument("--out", required=True)
    ex.add_argument("--keep-ties", action="store_true", help="keep items whose majority is a tie (not trainable: "
                    "counted, never written as pairs)")
    ex.add_argument("--keep-both-bad", action="store_true")
    ex.add_argument("--min-agreement", type=float, default=0.0, help="drop items whose majority share is below this")


def main(args) -> int:
    from pathlib import Path


    job = args.label_command
    if job != "init" and not Path(args.store).exists():
        print(f"error: no label store at {args.store} (align label init first)", file=sys.stderr)
        return 2
    try:
        if job == "serve":

            serve(args.store, args.host, args.port)
            return 0
        store = Store(args.store)
        if job == "init":
            if bool(args.pairs) == bool(args.arena):
                print("error: give --pairs FILE or --arena A B", file=sys.stderr)
                return 2
            items = results.items_from_pairs(args.pairs) if args.pairs else \
                results.items_from_arena(args.arena[0], args.arena[1], tuple(args.names))
            print(f"{store.add_items(items)} items added to {args.store}")
        elif job == "annotator":
            token = store.add_annotator(args.name, args.overlap)
            done, total = store.progress(store.annotator_for(token)[0])
            print(f"annotator {args.name}: {total} items assigned")
            print(f"http://{args.host}:{args.port}/label?token={token}")
        elif job == "stats":
            print(json.dumps(results.stats(store), indent=2))
        elif job == "export":
            report = results.export(store, args.out, drop_ties=not args.keep_ties,
                                    drop_both_bad=not args.keep_both_bad, min_agreement=args.min_agreement)
            print(json.dumps(report, indent=2))
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
