"""The `tally` fixture, and the session's fault totals printed after the test run (the figures
of docs/reliability.md, "Faults": `.venv/bin/pytest tests/faults`)."""

from __future__ import annotations

import pytest

from tests.faults.scenario import BACKEND_TIMEOUT, DENY_SLACK, TALLIES, Tally


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Tally:
    result = Tally(request.node.name, BACKEND_TIMEOUT + DENY_SLACK)
    TALLIES.append(result)
    return result


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not TALLIES:
        return
    write = terminalreporter.write_line
    terminalreporter.section("fault totals")
    write(
        f"{'scenario':<60} {'cases':>6} {'down':>5} {'wrong':>5} {'unans':>5} {'worst deny ms':>13}"
    )
    for t in TALLIES:
        down = sum(1 for o in t.outcomes if not o.up)
        write(
            f"{t.name[:60]:<60} {len(t.outcomes):>6} {down:>5} {len(t.wrong_admits):>5}"
            f" {len(t.unanswered):>5} {t.worst_deny * 1000:>13.1f}"
        )
        for key, value in t.notes.items():
            write(f"    {key}: {value}")
        for outcome, why in t.excused:
            write(f"    excused ({why}): {outcome}")
    excused = sum(len(t.excused) for t in TALLIES)
    cases = sum(len(t.outcomes) for t in TALLIES) + excused
    wrong = sum(len(t.wrong_admits) for t in TALLIES)
    unanswered = sum(len(t.unanswered) for t in TALLIES)
    worst = max(t.worst_deny for t in TALLIES)
    write(
        f"total: {cases} cases, {wrong} wrong admits, {unanswered} unanswered while up,"
        f" worst deny {worst * 1000:.1f} ms (bound {(BACKEND_TIMEOUT + DENY_SLACK) * 1000:.0f} ms),"
        f" {excused} excused"
    )
