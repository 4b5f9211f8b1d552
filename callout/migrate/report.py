"""What an import tells the operator: one line per problem (up to `REPORT_LIMIT`), the counts,
and what to do next; and the same as one JSON summary."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from callout.migrate.plan import ADDED, CONFLICTING, FAILED, INVALID, OVERWRITTEN, UNCHANGED
from callout.migrate.rows import Invalid, Item, where
from callout.migrate.sources import Collected

# Problems listed one by one (on stderr and in the summary); the counts are always complete.
REPORT_LIMIT = 1000
COUNTS = (ADDED, OVERWRITTEN, UNCHANGED, CONFLICTING, INVALID, FAILED)


@dataclass
class Report:
    rows: int
    dry_run: bool
    counts: dict[str, int]
    invalid: list[Invalid]
    conflicts: list[Item]
    failures: list[Item]

    @classmethod
    def of(cls, collected: Collected, *, dry_run: bool, planned: bool) -> Report:
        counts = dict.fromkeys(COUNTS, 0)
        counts[INVALID] = len(collected.invalid)
        conflicts: list[Item] = []
        failures: list[Item] = []
        if planned:
            for item in collected.items.values():
                counts[item.action] += 1
                if item.action == CONFLICTING:
                    conflicts.append(item)
                elif item.action == FAILED:
                    failures.append(item)
        return cls(collected.rows, dry_run, counts, collected.invalid, conflicts, failures)

    @property
    def ok(self) -> bool:
        return not (self.counts[INVALID] or self.counts[CONFLICTING] or self.counts[FAILED])

    @property
    def written(self) -> int:
        return 0 if self.dry_run else self.counts[ADDED] + self.counts[OVERWRITTEN]

    def summary(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            **self.counts,
            "written": self.written,
            "dry_run": self.dry_run,
            "invalid_rows": [row.as_json() for row in self.invalid[:REPORT_LIMIT]],
            "conflicts": [item.as_json() for item in self.conflicts[:REPORT_LIMIT]],
            "failures": [item.as_json() for item in self.failures[:REPORT_LIMIT]],
        }

    def lines(self) -> list[str]:
        out = [f"{where(row.at)}: {row.error}" for row in self.invalid[:REPORT_LIMIT]]
        out += _more(self.invalid)
        for items, what in ((self.conflicts, "conflicting"), (self.failures, "write failed")):
            out += [f"{where(i.at)}: {i.key}: {what}: {i.reason}" for i in items[:REPORT_LIMIT]]
            out += _more(items)
        counts = ", ".join(f"{self.counts[name]} {name}" for name in COUNTS)
        out.append(f"{self.rows} row{'' if self.rows == 1 else 's'}: {counts}")
        if self.counts[INVALID]:
            out.append("nothing written: fix the invalid rows and run it again")
        elif self.dry_run:
            out.append("dry run: nothing written")
        elif self.counts[CONFLICTING] and not self.counts[OVERWRITTEN]:
            out.append("conflicting records were kept (--overwrite replaces them)")
        if self.counts[FAILED]:
            out.append("some writes failed: run it again (what was written is now unchanged)")
        return out


def _more(problems: Collection[object]) -> list[str]:
    extra = len(problems) - REPORT_LIMIT
    return [f"... and {extra} more"] if extra > 0 else []
