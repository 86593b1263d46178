#!/usr/bin/env python3
"""What SQLite alone costs per event with orly's schema: 100,000 events shaped like
orly-bench's data set (1,000 authors, 90% kind 1 with a `p` tag, 10% kind 7 with `e` and `p`),
inserted in transactions of --batch (2,048, the writer's largest batch) with the writer's
probes and pragmas, through Python's sqlite3 (no signatures, no JSON parsing, no relay). Prints
CPU microseconds per event and the file size.

    python3 bench/scripts/sqlite-schema-cost.py [--batch 2048] [--cache-kib 16000] [--drop-index NAME]

`--drop-index events_pubkey_kind_created` measures the schema without that index (the
author+kind index of issue 15). See
docs/benchmarks.md.
"""
import argparse
import json
import os
import random
import sqlite3
import tempfile
import time

MIGRATIONS = os.path.join(os.path.dirname(__file__), "../../services/db/migrations/sqlite")

ap = argparse.ArgumentParser()
ap.add_argument("--events", type=int, default=100_000)
ap.add_argument("--cache-kib", type=int, default=16000)
ap.add_argument("--batch", type=int, default=2048)
ap.add_argument("--drop-index", default="")
ap.add_argument("--page-size", type=int, default=4096)
args = ap.parse_args()

with tempfile.TemporaryDirectory() as tmp:
    db = sqlite3.connect(os.path.join(tmp, "orly.db"), isolation_level=None)
    db.execute(f"PRAGMA page_size={args.page_size}")
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "foreign_keys=ON",
                   f"cache_size=-{args.cache_kib}", "temp_store=memory"):
        db.execute(f"PRAGMA {pragma}")
    for name in sorted(os.listdir(MIGRATIONS)):
        db.executescript(open(os.path.join(MIGRATIONS, name)).read())
    if args.drop_index:
        db.execute(f"DROP INDEX {args.drop_index}")

    authors = [os.urandom(32) for _ in range(1000)]
    now = int(time.time())
    rows = []
    for _ in range(args.events):
        pk = random.choice(authors)
        created = now - random.randint(0, 28 * 86400)
        kind = 1 if random.random() < 0.9 else 7
        eid = os.urandom(32)
        tags = [("p", random.choice(authors).hex())]
        if kind == 7:
            tags.append(("e", os.urandom(32).hex()))
        doc = json.dumps({"id": eid.hex(), "pubkey": pk.hex(), "created_at": created,
                          "kind": kind, "tags": [list(t) for t in tags], "content": "x" * 200,
                          "sig": os.urandom(64).hex()})
        rows.append((eid, pk, created, kind, doc, tags))

    def written():
        with open("/proc/self/io") as f:
            return int(next(l for l in f if l.startswith("wchar:")).split()[1])
    wchar = written()
    cpu = time.process_time()
    wall = time.time()
    for start in range(0, len(rows), args.batch):
        db.execute("BEGIN IMMEDIATE")
        for eid, pk, created, kind, doc, tags in rows[start:start + args.batch]:
            db.execute("SELECT EXISTS(SELECT 1 FROM events WHERE id = ?), "
                       "EXISTS(SELECT 1 FROM deleted_ids WHERE id = ? AND pubkey = ?)",
                       (eid, eid, pk)).fetchone()
            serial = db.execute("INSERT INTO events (id, pubkey, created_at, kind, d, expires_at, json) "
                                "VALUES (?, ?, ?, ?, NULL, NULL, ?)",
                                (eid, pk, created, kind, doc)).lastrowid
            for name, value in tags:
                db.execute("INSERT OR IGNORE INTO tags (name, value, created_at, serial) "
                           "VALUES (?, ?, ?, ?)", (name, value, created, serial))
        db.execute("COMMIT")
    cpu = time.process_time() - cpu
    wchar = written() - wchar
    wall = time.time() - wall
    size = sum(os.path.getsize(os.path.join(tmp, f)) for f in os.listdir(tmp))
    print(f"{args.events} events: {cpu / args.events * 1e6:.0f} us CPU per event, "
          f"{args.events / wall:.0f} events/s wall, {size / 1e6:.0f} MB on disk, "
          f"{wchar / args.events / 1024:.1f} KiB written per event")
