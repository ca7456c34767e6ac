#!/usr/bin/env python3
"""Which B-trees a SQLite commit writes, read from the database's write-ahead log.

    wal-pages.py DB [WINDOW_COMMITS]

DB and DB-wal must be a copy taken while the control plane ran with checkpoints held off
(SP_SQLITE_CHECKPOINT_MS=60000), so the log holds every commit of the run. Prints, per B-tree
(table or index), the pages each commit appended to the log and the distinct pages of a window
of WINDOW_COMMITS commits (default 300): what one checkpoint of that window writes back into
the database file, and fsyncs. docs/perf.md ("What a commit writes") explains the figures.
"""

import collections
import os
import shutil
import signal
import sqlite3
import struct
import sys
import tempfile

WAL_HEADER = 32
FRAME_HEADER = 24


def commits(wal_path):
    """The log's valid frames as one list of page numbers per commit, in order."""
    with open(wal_path, "rb") as f:
        header = f.read(WAL_HEADER)
        if len(header) < WAL_HEADER:
            sys.exit(f"{wal_path}: not a write-ahead log")
        page_size = struct.unpack(">I", header[8:12])[0]
        salts = header[16:24]
        out, pages = [], []
        while True:
            frame = f.read(FRAME_HEADER)
            if len(frame) < FRAME_HEADER or frame[8:16] != salts:
                break  # the end, or frames left from before the log was restarted
            pgno, commit_size = struct.unpack(">II", frame[:8])
            f.seek(page_size, os.SEEK_CUR)
            pages.append(pgno)
            if commit_size:
                out.append(pages)
                pages = []
    return out


def btree_of_pages(db_path):
    """Page number -> B-tree name, read with dbstat from a copy (opening it applies the log)."""
    with tempfile.TemporaryDirectory() as tmp:
        copy = os.path.join(tmp, "copy.db")
        shutil.copy(db_path, copy)
        if os.path.exists(db_path + "-wal"):
            shutil.copy(db_path + "-wal", copy + "-wal")
        conn = sqlite3.connect(copy)
        owner = dict(conn.execute("SELECT pageno, name FROM dbstat"))
        conn.close()
    return owner


def main():
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `| head` ends the output quietly
    if len(sys.argv) not in (2, 3):
        sys.exit(__doc__)
    db = sys.argv[1]
    window = int(sys.argv[2]) if len(sys.argv) == 3 else 300
    log = commits(db + "-wal")
    if not log:
        sys.exit("the log holds no commit: was it checkpointed before the copy?")
    owner = btree_of_pages(db)
    name = lambda pgno: owner.get(pgno, "(free or header)")

    frames = collections.Counter(name(p) for c in log for p in c)
    windows = [log[i:i + window] for i in range(0, len(log) - window + 1, window)] or [log]
    distinct = collections.Counter()
    for w in windows:
        for tree, _page in {(name(p), p) for c in w for p in c}:
            distinct[tree] += 1
    total_frames = sum(frames.values())
    total_distinct = sum(distinct.values()) / len(windows)
    print(f"{len(log)} commits, {total_frames / len(log):.2f} pages per commit; "
          f"{total_distinct:.0f} distinct pages per window of {len(windows[0])} commits "
          f"({len(windows)} windows)")
    print(f"{'B-tree':44} {'pages/commit':>12} {'distinct/window':>16}")
    for tree, n in frames.most_common():
        print(f"{tree:44} {n / len(log):12.2f} {distinct[tree] / len(windows):16.1f}")


if __name__ == "__main__":
    main()
