"""Labelling server under load: concurrent scripted annotators over HTTP, every label stored exactly once.

    .venv/bin/python -m bench.label [--annotators 20] [--labels 50]

Makes a store with annotators x labels items, gives every annotator their own share (overlap 1, so the
expected store is exact), starts `align label serve` on a free loopback port, and runs one thread per
annotator that fetches its next item and submits a label (the verifier's way: prefer candidate a) until
its share is done, timing each submit. Then checks the store: exactly annotators x labels labels, no
item labelled twice, none missing. There is no peer (Argilla and Label Studio need servers of their own
that cannot run here), so the RESULT line carries peer=0 ratio=0.

Ends with:
    RESULT name=label-throughput ours=<labels/s> peer=0 unit=labels/s ratio=0
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from bench.harness import PYTHON, REPO, argument_parser, bench_env, bench_workdir

MODULE = "bench.label"


def call(url: str, body: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def main(argv=None) -> int:
    p = argument_parser(MODULE, __doc__)
    p.add_argument("--annotators", type=int, default=20)
    p.add_argument("--labels", type=int, default=50, help="labels per annotator")
    args = p.parse_args(argv)

    with bench_workdir(None, "bench-label-") as work:
        return serve_and_label(args, work / "labels.db")


def serve_and_label(args, db) -> int:
    from alignment.collect.label.store import Item, Store
    from alignment.core.distributed import free_port

    store = Store(db)
    total = args.annotators * args.labels
    store.add_items([Item(f"q{i}", f"What is {i} + 1?", str(i + 1), str(i + 2), {}) for i in range(total)])
    tokens = [store.add_annotator(f"a{k}", overlap=0) for k in range(args.annotators)]  # none assigned yet
    ids = [store.annotator_for(t)[0] for t in tokens]
    for i in range(total):  # an even share each: every item has exactly one annotator
        store.db.execute("INSERT INTO assignments VALUES (?, ?, 'a', NULL)", (f"q{i}", ids[i % args.annotators]))
    store.close()

    port = free_port()
    server = subprocess.Popen([PYTHON, "-m", "alignment.cli", "label", "serve", str(db), "--port", str(port)],
                              cwd=REPO, env=bench_env(), start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                break
        except OSError:
            time.sleep(0.1)
    latencies: list[float] = []
    failures: list[str] = []
    lock = threading.Lock()

    def annotator(token: str) -> None:
        status, nxt = call(f"{base}/api/next?token={token}")
        headers = {"X-Annotator-Token": token, "X-CSRF-Token": nxt["csrf"]}
        for _ in range(args.labels):
            status, nxt = call(f"{base}/api/next?token={token}")
            if nxt.get("item") is None:
                with lock:
                    failures.append(f"{token[:6]}: ran out of items early")
                return
            started = time.perf_counter()
            status, body = call(f"{base}/api/label", {"item_id": nxt["item"]["id"], "choice": "left"}, headers)
            took = time.perf_counter() - started
            with lock:
                latencies.append(took)
                if status != 200:
                    failures.append(f"{status} {body}")

    threads = [threading.Thread(target=annotator, args=(t,)) for t in tokens]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=30)

    store = Store(db)
    labels = store.labels()
    per_item = {}
    for label in labels:
        per_item[label["item_id"]] = per_item.get(label["item_id"], 0) + 1
    duplicated = sum(1 for c in per_item.values() if c > 1)
    missing = total - len(per_item)
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p95 = latencies[int(len(latencies) * 0.95)] * 1000
    print(f"{args.annotators} annotators x {args.labels} labels over HTTP in {wall:.1f}s: {len(labels)} stored, "
          f"{missing} missing, {duplicated} duplicated, {len(failures)} failed requests; "
          f"submit latency p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    if failures:
        print("first failures:", failures[:3])
    ok = len(labels) == total and missing == 0 and duplicated == 0 and not failures
    print(f"exactly once: {'yes' if ok else 'NO'}")
    print(f"RESULT name=label-throughput ours={len(labels) / wall:.2f} peer=0 unit=labels/s ratio=0")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
