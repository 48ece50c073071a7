"""The labelling store: one SQLite file (WAL) holding items, annotators, their assignments and labels.

Every label is committed (synchronous=FULL) before the server answers, so a kill -9 loses nothing it
acknowledged. Tokens are stored as SHA-256 hashes. Sides are randomised per (item, annotator) when
the item is assigned, and the label records which candidate was on the left.

Items come in two kinds, one kind per store:
- 'pair': a prompt and two candidates `a` and `b` (from `align pairs` output, any preference file, or two
  policies' answers to the same prompts in arena mode), labelled left / right / tie / both_bad;
- 'single': a prompt and one answer `a` (thumbs up or down), labelled good / bad with an optional reason.
Metadata says where they came from, an AI judge's scores when the source had them, the policy names in
arena mode.

An annotator may skip an item (it comes back after the others), go back to an item they labelled and change
the label (replace), and undo their last label: the item comes back first, with the undone choice, strength
and rationale kept as a draft the page shows again. The store also keeps the labelling guidelines (markdown)
and the address the server last listened on (so annotator links follow it).
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 2
CHOICES = ("left", "right", "tie", "both_bad")
SINGLE_CHOICES = ("good", "bad")
STRENGTHS = (1, 2, 3)  # slightly, clearly, much better
KINDS = ("pair", "single")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL, prompt TEXT NOT NULL, a TEXT NOT NULL, b TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}', kind TEXT NOT NULL DEFAULT 'pair');
CREATE TABLE IF NOT EXISTS annotators (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    item_id TEXT NOT NULL REFERENCES items(id), annotator_id TEXT NOT NULL REFERENCES annotators(id),
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')), shown REAL,
    skipped REAL, reopened REAL, draft TEXT,
    PRIMARY KEY (item_id, annotator_id));
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL REFERENCES items(id),
    annotator_id TEXT NOT NULL REFERENCES annotators(id), choice TEXT NOT NULL,
    preferred TEXT CHECK (preferred IN ('a', 'b') OR preferred IS NULL), strength INTEGER, rationale TEXT,
    left_side TEXT NOT NULL, created REAL NOT NULL, seconds REAL, updated REAL,
    UNIQUE (item_id, annotator_id));
"""
# what version 1 stores lack (added in place when such a store is opened)
MIGRATE_1_TO_2 = ["ALTER TABLE items ADD COLUMN kind TEXT NOT NULL DEFAULT 'pair'",
                  "ALTER TABLE assignments ADD COLUMN skipped REAL", "ALTER TABLE assignments ADD COLUMN reopened REAL",
                  "ALTER TABLE assignments ADD COLUMN draft TEXT", "ALTER TABLE labels ADD COLUMN updated REAL"]


class StoreError(Exception):
    """A request the store refuses; `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def preferred_candidate(choice: str, left_side: str) -> str | None:
    """The candidate ('a' or 'b') a choice prefers, given which one was shown on the left; None for tie / both bad."""
    if choice == "left":
        return left_side
    if choice == "right":
        return "b" if left_side == "a" else "a"
    return None


@dataclass
class Item:
    id: str
    prompt: str
    a: str
    b: str
    meta: dict
    kind: str = "pair"  # or "single": one answer (a), b empty


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a label is on disk before the server acknowledges it
        self.db.execute("PRAGMA foreign_keys=ON")
        exists = self.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone()
        version = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() if exists else None
        if version is not None and int(version[0]) == 1:
            with self.db:
                self.db.execute("BEGIN IMMEDIATE")
                for statement in MIGRATE_1_TO_2:
                    self.db.execute(statement)
                self.db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),))
        elif version is not None and int(version[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version[0]}, this code reads {SCHEMA_VERSION}")
        self.db.executescript(SCHEMA)
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    def close(self) -> None:
        self.db.close()

    # -- items and annotators ---------------------------------------------------------------
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, value))

    def guidelines(self) -> str:
        """The labelling guidelines (markdown) given at `align label init --guidelines`, or ''."""
        return self.get_meta("guidelines") or ""

    def set_guidelines(self, text: str) -> None:
        self.set_meta("guidelines", text)

    def kind(self) -> str | None:
        """'pair' or 'single' (the store's items), None while it holds none."""
        row = self.db.execute("SELECT kind FROM items LIMIT 1").fetchone()
        return None if row is None else row[0]

    def add_items(self, items: list[Item]) -> int:
        kinds = {item.kind for item in items} | ({self.kind()} - {None})
        if len(kinds) > 1 or not kinds <= set(KINDS):
            raise StoreError(f"{self.path} would mix {' and '.join(sorted(map(str, kinds)))} items: one store holds "
                             "pairs (--pairs, --arena) or single answers (--responses), never both")
        start = self.db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM items").fetchone()[0]
        with self.db:
            self.db.execute("BEGIN")
            for i, item in enumerate(items):
                try:
                    self.db.execute("INSERT INTO items (id, position, prompt, a, b, meta, kind) "
                                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                                    (item.id, start + i, item.prompt, item.a, item.b, json.dumps(item.meta), item.kind))
                except sqlite3.IntegrityError:
                    raise StoreError(f"item id {item.id!r} is already in {self.path}") from None
        return len(items)

    def add_annotator(self, name: str, overlap: int | None = None, seed: int = 0) -> str:
        """A new annotator; returns their token (shown once). Assigns every item, or with `overlap` N
        the items that have fewer than N annotators so far."""
        token = secrets.token_urlsafe(24)
        annotator_id = secrets.token_hex(6)
        try:
            self.db.execute("INSERT INTO annotators VALUES (?, ?, ?, ?)", (annotator_id, name, token_hash(token),
                                                                          time.time()))
        except sqlite3.IntegrityError:
            raise StoreError(f"an annotator named {name!r} exists already") from None
        self.assign(annotator_id, overlap, seed)
        return token

    def assign(self, annotator_id: str, overlap: int | None, seed: int = 0) -> int:
        rows = self.db.execute(
            "SELECT i.id, i.kind, COUNT(s.annotator_id) FROM items i LEFT JOIN assignments s ON s.item_id = i.id "
            "GROUP BY i.id ORDER BY i.position").fetchall()
        rng = random.Random(f"{seed}:{annotator_id}")
        chosen = [(item, kind) for item, kind, count in rows if overlap is None or count < overlap]
        with self.db:
            self.db.execute("BEGIN")
            for item, kind in chosen:
                side = rng.choice("ab") if kind == "pair" else "a"  # one answer: nothing to randomise
                self.db.execute("INSERT OR IGNORE INTO assignments (item_id, annotator_id, left_side) VALUES (?, ?, ?)",
                                (item, annotator_id, side))
        return len(chosen)

    def reissue(self, name: str) -> str:
        """A new token for an existing annotator (the old link stops working); returns it."""
        token = secrets.token_urlsafe(24)
        cur = self.db.execute("UPDATE annotators SET token_sha256 = ? WHERE name = ?", (token_hash(token), name))
        if cur.rowcount == 0:
            raise StoreError(f"no annotator named {name!r}", 404)
        return token

    def annotator_for(self, token: str | None) -> tuple[str, str]:
        if not token:
            raise StoreError("an annotator token is required", 401)
        row = self.db.execute("SELECT id, name FROM annotators WHERE token_sha256 = ?", (token_hash(token),)).fetchone()
        if row is None:
            raise StoreError("unknown annotator token", 401)
        return row[0], row[1]

    def annotators(self) -> list[tuple[str, str]]:
        return self.db.execute("SELECT id, name FROM annotators ORDER BY created").fetchall()

    # -- labelling --------------------------------------------------------------------------
    def next_item(self, annotator_id: str) -> tuple[Item, str] | None:
        """The annotator's next unlabelled item and the side shown on the left; marks when it was shown. An item
        brought back by undo comes first; skipped items come after the others, the earliest skipped first."""
        row = self.db.execute(
            "SELECT i.id, i.prompt, i.a, i.b, i.meta, i.kind, s.left_side FROM assignments s "
            "JOIN items i ON i.id = s.item_id WHERE s.annotator_id = ? AND NOT EXISTS (SELECT 1 FROM labels l "
            "WHERE l.item_id = s.item_id AND l.annotator_id = s.annotator_id) "
            "ORDER BY s.reopened IS NULL, s.reopened DESC, s.skipped IS NOT NULL, s.skipped, i.position LIMIT 1",
            (annotator_id,)).fetchone()
        if row is None:
            return None
        self.db.execute("UPDATE assignments SET shown = COALESCE(shown, ?) WHERE item_id = ? AND annotator_id = ?",
                        (time.time(), row[0], annotator_id))
        return Item(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5]), row[6]

    def assigned_item(self, annotator_id: str, item_id: str) -> tuple[Item, str]:
        """One of the annotator's items (labelled or not) and the side shown on the left."""
        row = self.db.execute(
            "SELECT i.id, i.prompt, i.a, i.b, i.meta, i.kind, s.left_side FROM items i LEFT JOIN assignments s "
            "ON s.item_id = i.id AND s.annotator_id = ? WHERE i.id = ?", (annotator_id, item_id)).fetchone()
        if row is None:
            raise StoreError(f"unknown item {item_id!r}", 404)
        if row[6] is None:
            raise StoreError(f"item {item_id!r} is not assigned to you", 403)
        return Item(row[0], row[1], row[2], row[3], json.loads(row[4]), row[5]), row[6]

    def progress(self, annotator_id: str) -> tuple[int, int]:
        done = self.db.execute("SELECT COUNT(*) FROM labels WHERE annotator_id = ?", (annotator_id,)).fetchone()[0]
        total = self.db.execute("SELECT COUNT(*) FROM assignments WHERE annotator_id = ?", (annotator_id,)).fetchone()[0]
        return done, total

    def skipped(self, annotator_id: str) -> int:
        """How many of the annotator's unlabelled items are skipped (they come back after the others)."""
        return self.db.execute(
            "SELECT COUNT(*) FROM assignments s WHERE s.annotator_id = ? AND s.skipped IS NOT NULL AND NOT EXISTS "
            "(SELECT 1 FROM labels l WHERE l.item_id = s.item_id AND l.annotator_id = s.annotator_id)",
            (annotator_id,)).fetchone()[0]

    def add_label(self, annotator_id: str, item_id: str, choice: str, strength: int | None = None,
                  rationale: str | None = None, replace: bool = False) -> int:
        """Store a label (committed when this returns). `replace`: the annotator changes a label they gave
        earlier (going back); without it a second label of one item is refused (409)."""
        kind_row = self.db.execute("SELECT kind FROM items WHERE id = ?", (item_id,)).fetchone()
        allowed = SINGLE_CHOICES if kind_row is not None and kind_row[0] == "single" else CHOICES
        if choice not in allowed:
            raise StoreError(f"choice must be one of {', '.join(allowed)}", 422)
        if strength is not None and (choice not in ("left", "right") or strength not in STRENGTHS):
            raise StoreError("strength is 1, 2 or 3, and only for 'left' or 'right'", 422)
        assigned = self.db.execute("SELECT left_side, shown FROM assignments WHERE item_id = ? AND annotator_id = ?",
                                   (item_id, annotator_id)).fetchone()
        if assigned is None:
            exists = kind_row is not None
            raise StoreError(f"unknown item {item_id!r}" if not exists else f"item {item_id!r} is not assigned to you",
                             404 if not exists else 403)
        left_side, shown = assigned
        now = time.time()
        preferred = preferred_candidate(choice, left_side)
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            existing = self.db.execute("SELECT id FROM labels WHERE item_id = ? AND annotator_id = ?",
                                       (item_id, annotator_id)).fetchone()
            if existing is not None:
                if not replace:
                    raise StoreError(f"item {item_id!r} is already labelled by you (undo it first)", 409)
                self.db.execute("UPDATE labels SET choice = ?, preferred = ?, strength = ?, rationale = ?, updated = ? "
                                "WHERE id = ?", (choice, preferred, strength, rationale, now, existing[0]))
                label_id = existing[0]
            else:
                cur = self.db.execute(
                    "INSERT INTO labels (item_id, annotator_id, choice, preferred, strength, rationale, left_side, "
                    "created, seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (item_id, annotator_id, choice, preferred, strength, rationale, left_side, now,
                     now - shown if shown else None))
                label_id = cur.lastrowid
            self.db.execute("UPDATE assignments SET skipped = NULL, reopened = NULL, draft = NULL "
                            "WHERE item_id = ? AND annotator_id = ?", (item_id, annotator_id))
        return label_id

    def skip(self, annotator_id: str, item_id: str) -> None:
        """Put an unlabelled item after the others; it comes back when they are done."""
        self.assigned_item(annotator_id, item_id)
        if self.label_of(annotator_id, item_id) is not None:
            raise StoreError(f"item {item_id!r} is labelled already (go back to change it)", 409)
        self.db.execute("UPDATE assignments SET skipped = ?, reopened = NULL, shown = NULL "
                        "WHERE item_id = ? AND annotator_id = ?", (time.time(), item_id, annotator_id))

    def undo_last(self, annotator_id: str) -> str | None:
        """Delete the annotator's most recent label; returns its item id (shown again next, with the undone choice,
        strength and rationale as a draft)."""
        row = self.db.execute("SELECT id, item_id, choice, strength, rationale FROM labels WHERE annotator_id = ? "
                              "ORDER BY COALESCE(updated, created) DESC, id DESC LIMIT 1", (annotator_id,)).fetchone()
        if row is None:
            return None
        draft = json.dumps({"choice": row[2], "strength": row[3], "rationale": row[4]})
        with self.db:
            self.db.execute("BEGIN IMMEDIATE")
            self.db.execute("DELETE FROM labels WHERE id = ?", (row[0],))
            self.db.execute("UPDATE assignments SET shown = NULL, skipped = NULL, reopened = ?, draft = ? "
                            "WHERE item_id = ? AND annotator_id = ?", (time.time(), draft, row[1], annotator_id))
        return row[1]

    def draft(self, annotator_id: str, item_id: str) -> dict | None:
        """The choice, strength and rationale an undo took back from this item, if any."""
        row = self.db.execute("SELECT draft FROM assignments WHERE item_id = ? AND annotator_id = ?",
                              (item_id, annotator_id)).fetchone()
        return json.loads(row[0]) if row and row[0] else None

    def label_of(self, annotator_id: str, item_id: str) -> dict | None:
        row = self.db.execute("SELECT choice, strength, rationale FROM labels WHERE item_id = ? AND annotator_id = ?",
                              (item_id, annotator_id)).fetchone()
        return None if row is None else {"choice": row[0], "strength": row[1], "rationale": row[2]}

    def history(self, annotator_id: str) -> list[str]:
        """The items this annotator labelled, in the order they first labelled them (back and forward)."""
        return [r[0] for r in self.db.execute("SELECT item_id FROM labels WHERE annotator_id = ? ORDER BY id",
                                              (annotator_id,)).fetchall()]

    def labels(self, annotator_id: str | None = None) -> list[dict]:
        query = ("SELECT l.id, l.item_id, l.annotator_id, a.name, l.choice, l.preferred, l.strength, l.rationale, "
                 "l.left_side, l.created, l.seconds, l.updated FROM labels l JOIN annotators a ON a.id = l.annotator_id")
        args: tuple = ()
        if annotator_id:
            query += " WHERE l.annotator_id = ?"
            args = (annotator_id,)
        keys = ("id", "item_id", "annotator_id", "annotator", "choice", "preferred", "strength", "rationale",
                "left_side", "created", "seconds", "updated")
        return [dict(zip(keys, row)) for row in self.db.execute(query + " ORDER BY l.id", args).fetchall()]

    def items(self) -> list[Item]:
        return [Item(r[0], r[1], r[2], r[3], json.loads(r[4]), r[5])
                for r in self.db.execute("SELECT id, prompt, a, b, meta, kind FROM items ORDER BY position").fetchall()]
