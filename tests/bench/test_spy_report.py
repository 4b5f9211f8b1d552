"""The runner's py-spy summary: inclusive and own shares from collapsed stacks."""

from __future__ import annotations

from pathlib import Path

from bench.runner import spy_report

LOOP = "0x7f59 (libc.so.6);run (asyncio/runners.py:118)"
HANDLE = "_handle (callout/service.py:{line})"
STACKS = [
    f"{LOOP};{HANDLE.format(line=300)};verify (nacl/signing.py:110);"
    "crypto_sign_open (nacl/bindings/crypto_sign.py:103);_crypto_sign_ed25519_verify (open.c:53) 6",
    f"{LOOP};{HANDLE.format(line=301)};sign (nacl/signing.py:200) 3",
    f"{LOOP};_flush (nats/aio/client.py:2000);send (socket.c:12) 1",
    f"{LOOP};uv__io_poll (core.c:1);epoll_pwait (libc.so.6) 5",
    "not a stack line",
]


def test_shares_are_of_busy_samples_and_native_code_counts_in_its_python_caller(
    tmp_path: Path,
) -> None:
    path = tmp_path / "svc.plain.txt"
    path.write_text("\n".join(STACKS) + "\n")
    lines = spy_report(path, top=5).splitlines()
    assert lines[0] == (
        "--- svc.plain.txt: 10 busy samples at 250 Hz (py-spy --native;"
        " 5 idle in the event loop's wait left out) ---"
    )
    inclusive = lines[lines.index("top 5 by inclusive:") + 1 :][:5]
    # _handle's two lines (service.py:300 and :301) count as one function; ties by name; the
    # event loop's own frames are on every stack and left out.
    assert inclusive == [
        "  90.0 %  service.py:_handle",
        "  60.0 %  crypto_sign.py:crypto_sign_open",
        "  60.0 %  open.c:_crypto_sign_ed25519_verify",
        "  60.0 %  signing.py:verify",
        "  30.0 %  signing.py:sign",
    ]
    own = lines[lines.index("top 5 by own (Python function):") + 1 :][:4]
    assert own == [
        "  60.0 %  crypto_sign.py:crypto_sign_open",
        "  30.0 %  signing.py:sign",
        "  10.0 %  client.py:_flush",
    ]
