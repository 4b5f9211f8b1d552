"""Bulk import and export of user records: the old control plane's SQLite allowlist, CSV or
JSON lines in; JSON lines out.

Three steps, so that nothing is written unless the whole input is valid, and nothing written
can clobber an edit someone makes meanwhile:

1. read (`sources`): a source yields one `Item` (a valid row: key and the record bytes to
   store, `rows`) or one `Invalid` (with its line or row id) per input row, streaming;
   `collect` keeps the items by key, and turns a repeated key into an invalid row.
2. `plan`: the bucket's current value of each key (one scan of the bucket, or one point read
   per key when the bucket is much larger than the input) classifies it as added /
   unchanged / overwritten / conflicting, and the revision seen is remembered.
3. `apply`: a create for each new key, a compare-and-set update at the planned revision for
   each overwrite. A key that changed since it was planned is a conflict and is left alone.

`report` says what happened. The reads and writes themselves are the store layer's
(`callout.store.kv`: `scan`, `KVStore`, `create`, `update`, `KVBucket`).

Records are stored complete (every field explicit); a row is read exactly as the service
reads a record, so an unknown or repeated key is an invalid row (a control plane's own data
goes in `meta`). A stored record is unchanged when every record field and every field the
input names are equal; fields the input does not name are not compared, and are kept when
the record is overwritten. So a second run, and an export imported back, are all
unchanged.
"""

from callout.migrate.apply import apply
from callout.migrate.plan import IN_FLIGHT, Bucket, plan
from callout.migrate.report import COUNTS, Report
from callout.migrate.rows import FIELDS, Invalid, Item, export_line
from callout.migrate.sources import (
    Collected,
    SourceError,
    SqliteSource,
    collect,
    read_csv,
    read_jsonl,
)

__all__ = [
    "COUNTS",
    "FIELDS",
    "IN_FLIGHT",
    "Bucket",
    "Collected",
    "Invalid",
    "Item",
    "Report",
    "SourceError",
    "SqliteSource",
    "apply",
    "collect",
    "export_line",
    "plan",
    "read_csv",
    "read_jsonl",
]
