"""The `tally` fixture, and the session's fault totals printed after the test run (the figures
of docs/reliability.md, "Faults": `.venv/bin/pytest tests/faults`). Tests marked as expected
failures demonstrate known bugs: their figures are shown, and totalled apart."""

from __future__ import annotations

import pytest

from tests.support.witness import BACKEND_TIMEOUT, DENY_SLACK, TALLIES, Tally


@pytest.fixture
def tally(request: pytest.FixtureRequest) -> Tally:
    result = Tally(request.node.name, BACKEND_TIMEOUT + DENY_SLACK)
    result.known_bug = request.node.get_closest_marker("xfail") is not None
    TALLIES.append(result)
    return result


def _totals(tallies: list[Tally]) -> str:
    excused = sum(len(t.excused) for t in tallies)
    cases = sum(len(t.outcomes) for t in tallies) + excused
    wrong = sum(len(t.wrong_admits) for t in tallies)
    unanswered = sum(len(t.unanswered) for t in tallies)
    worst = max((t.worst_deny for t in tallies), default=0.0)
    return (
        f"{cases} cases, {wrong} wrong admits, {unanswered} unanswered while up,"
        f" worst deny {worst * 1000:.1f} ms (bound {(BACKEND_TIMEOUT + DENY_SLACK) * 1000:.0f} ms),"
        f" {excused} excused"
    )


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
        mark = " (known bug)" if t.known_bug else ""
        write(
            f"{(t.name + mark)[:60]:<60} {len(t.outcomes):>6} {down:>5}"
            f" {len(t.wrong_admits):>5} {len(t.unanswered):>5} {t.worst_deny * 1000:>13.1f}"
        )
        for key, value in t.notes.items():
            write(f"    {key}: {value}")
        for outcome, why in t.excused:
            write(f"    excused ({why}): {outcome}")
    write("total: " + _totals([t for t in TALLIES if not t.known_bug]))
    if bugs := [t for t in TALLIES if t.known_bug]:
        write("known bugs (expected failures): " + _totals(bugs))
