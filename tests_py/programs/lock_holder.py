"""Child that holds a SQLite write lock on a file until told to let go.

Usage: lock_holder.py DB_PATH

Opens the file with the standard sqlite3 module, runs ``BEGIN EXCLUSIVE`` and prints ``locked``;
on the line ``release`` it rolls back and prints ``released``; it exits when stdin closes.
Holding the lock in another *process* matters: POSIX advisory locks do not conflict within one
process, so a second SQLite library in the test process would not see this one's lock.
"""

from __future__ import annotations

import sqlite3
import sys

conn = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=0)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
for line in sys.stdin:
    if line.strip() == "release":
        conn.execute("ROLLBACK")
        print("released", flush=True)
conn.close()
