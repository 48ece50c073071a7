"""The labelling store: one SQLite file (WAL) holding items, annotators, their assignments and labels.

Every label is committed (synchronous=FULL) before the server answers, so a kill -9 loses nothing it
acknowledged. Tokens are stored as SHA-256 hashes. Sides are randomised per (item, annotator) when
the item is assigned, and the label records which candidate was on the left.

Items: a prompt and two candidates `a` and `b` (from `align pairs` output, any preference file, or two
policies' answers to the same prompts in arena mode), with metadata: where they came from, an AI
judge's scores when the source had them, the policy names in arena mode.
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

SCHEMA_VERSION = 1
CHOICES = ("left", "right", "tie", "both_bad")
STRENGTHS = (1, 2, 3)  # slightly, clearly, much better

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS items (
    id TEXT PRIMARY KEY, position INTEGER NOT NULL, prompt TEXT NOT NULL, a TEXT NOT NULL, b TEXT NOT NULL,
    meta TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS annotators (
    id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, token_sha256 TEXT NOT NULL UNIQUE, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    item_id TEXT NOT NULL REFERENCES items(id), annotator_id TEXT NOT NULL REFERENCES annotators(id),
    left_side TEXT NOT NULL CHECK (left_side IN ('a', 'b')), shown REAL,
    PRIMARY KEY (item_id, annotator_id));
CREATE TABLE IF NOT EXISTS labels (
    id INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL REFERENCES items(id),
    annotator_id TEXT NOT NULL REFERENCES annotators(id), choice TEXT NOT NULL,
    preferred TEXT CHECK (preferred IN ('a', 'b') OR preferred IS NULL), strength INTEGER, rationale TEXT,
    left_side TEXT NOT NULL, created REAL NOT NULL, seconds REAL,
    UNIQUE (item_id, annotator_id));
"""


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


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")  # a label is on disk before the server acknowledges it
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        version = self.db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if version is None:
            self.db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(version[0]) != SCHEMA_VERSION:
            raise StoreError(f"{self.path}: schema version {version[0]}, this code reads {SCHEMA_VERSION}")

    def close(self) -> None:
        self.db.close()

    # -- items and annotators ---------------------------------------------------------------
    def add_items(self, items: list[Item]) -> int:
        start = self.db.execute("SELECT COALESCE(MAX(position), -1) + 1 FROM items").fetchone()[0]
        with self.db:
            self.db.execute("BEGIN")
            for i, item in enumerate(items):
                try:
                    self.db.execute("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?)",
                                    (item.id, start + i, item.prompt, item.a, item.b, json.dumps(item.meta)))
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
            "SELECT i.id, COUNT(s.annotator_id) FROM items i LEFT JOIN assignments s ON s.item_id = i.id "
            "GROUP BY i.id ORDER BY i.position").fetchall()
        rng = random.Random(f"{seed}:{annotator_id}")
        chosen = [item for item, count in rows if overlap is None or count < overlap]
        with self.db:
            self.db.execute("BEGIN")
            for item in chosen:
                self.db.execute("INSERT OR IGNORE INTO assignments VALUES (?, ?, ?, NULL)",
                                (item, annotator_id, rng.choice("ab")))
        return len(chosen)

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
        """The annotator's first unlabelled item and the side shown on the left; marks when it was shown."""
        row = self.db.execute(
            "SELECT i.id, i.prompt, i.a, i.b, i.meta, s.left_side FROM assignments s JOIN items i ON i.id = s.item_id "
            "WHERE s.annotator_id = ? AND NOT EXISTS (SELECT 1 FROM labels l WHERE l.item_id = s.item_id "
            "AND l.annotator_id = s.annotator_id) ORDER BY i.position LIMIT 1", (annotator_id,)).fetchone()
        if row is None:
            return None
        self.db.execute("UPDATE assignments SET shown = COALESCE(shown, ?) WHERE item_id = ? AND annotator_id = ?",
                        (time.time(), row[0], annotator_id))
        return Item(row[0], row[1], row[2], row[3], json.loads(row[4])), row[5]

    def progress(self, annotator_id: str) -> tuple[int, int]:
        done = self.db.execute("SELECT COUNT(*) FROM labels WHERE annotator_id = ?", (annotator_id,)).fetchone()[0]
        total = self.db.execute("SELECT COUNT(*) FROM assignments WHERE annotator_id = ?", (annotator_id,)).fetchone()[0]
        return done, total

    def add_label(self, annotator_id: str, item_id: str, choice: str, strength: int | None = None,
                  rationale: str | None = None) -> int:
        if choice not in CHOICES:
            raise StoreError(f"choice must be one of {', '.join(CHOICES)}", 422)
        if strength is not None and (choice not in ("left", "right") or strength not in STRENGTHS):
            raise StoreError("strength is 1, 2 or 3, and only for 'left' or 'right'", 422)
        assigned = self.db.execute("SELECT left_side, shown FROM assignments WHERE item_id = ? AND annotator_id = ?",
                                   (item_id, annotator_id)).fetchone()
        if assigned is None:
            exists = self.db.execute("SELECT 1 FROM items WHERE id = ?", (item_id,)).fetchone()
            raise StoreError(f"unknown item {item_id!r}" if exists is None else f"item {item_id!r} is not assigned to you",
                             404 if exists is None else 403)
        left_side, shown = assigned
        now = time.time()
        try:
            cur = self.db.execute(
                "INSERT INTO labels (item_id, annotator_id, choice, preferred, strength, rationale, left_side, created, "
                "seconds) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (item_id, annotator_id, choice, preferred_candidate(choice, left_side), strength, rationale, left_side,
                 now, now - shown if shown else None))
        except sqlite3.IntegrityError:
            raise StoreError(f"item {item_id!r} is already labelled by you (undo it first)", 409) from None
        return cur.lastrowid

    def undo_last(self, annotator_id: str) -> str | None:
        """Delete the annotator's most recent label; returns its item id (shown again next)."""
        row = self.db.execute("SELECT id, item_id FROM labels WHERE annotator_id = ? ORDER BY id DESC LIMIT 1",
                              (annotator_id,)).fetchone()
        if row is None:
            return None
        self.db.execute("DELETE FROM labels WHERE id = ?", (row[0],))
        self.db.execute("UPDATE assignments SET shown = NULL WHERE item_id = ? AND annotator_id = ?",
                        (row[1], annotator_id))
        return row[1]

    def labels(self, annotator_id: str | None = None) -> list[dict]:
        query = ("SELECT l.id, l.item_id, l.annotator_id, a.name, l.choice, l.preferred, l.strength, l.rationale, "
                 "l.left_side, l.created, l.seconds FROM labels l JOIN annotators a ON a.id = l.annotator_id")
        args: tuple = ()
        if annotator_id:
            query += " WHERE l.annotator_id = ?"
            args = (annotator_id,)
        keys = ("id", "item_id", "annotator_id", "annotator", "choice", "preferred", "strength", "rationale",
                "left_side", "created", "seconds")
        return [dict(zip(keys, row)) for row in self.db.execute(query + " ORDER BY l.id", args).fetchall()]

    def items(self) -> list[Item]:
        return [Item(r[0], r[1], r[2], r[3], json.loads(r[4]))
                for r in self.db.execute("SELECT id, prompt, a, b, meta FROM items ORDER BY position").fetchall()]
