"""Every hostile case through the sans-I/O core with the case's fixed clock: denied with its
one expected reason, nothing admitted, no exception out of `open`/`decide`/`respond`, and
the answer is an empty body, a signed error addressed to the request (sealed back when the
request was sealed), or, for expired requests only, nothing.

Also: the corpus on disk is exactly what `make_corpus.py` writes (nobody hand-edits a case
into passing), it covers every kind of input the issue lists, and the request every case is
derived from is admitted (so each case is denied for its hostile part, not by accident).
"""

from __future__ import annotations

import json

import nkeys
import pytest

from callout import decision as d
from callout.decision import Request
from tests.support import forge
from tests.support import make_corpus as mc
from tests.support.hostile import (
    CORPUS,
    UNADDRESSABLE,
    Case,
    check_answer,
    dump,
    from_doc,
    load_all,
    run_core,
)

CASES = load_all()


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_case_is_denied_with_its_reason(case: Case) -> None:
    outcome = run_core(case)
    check_answer(case, outcome.decision, outcome.body)


def test_corpus_on_disk_is_what_the_generator_writes() -> None:
    wanted = mc.files(mc.build())
    present = {p.name: p.read_text() for p in CORPUS.glob("*.json")}
    assert sorted(present) == sorted(wanted)
    stale = sorted(name for name in wanted if present[name] != wanted[name])
    assert not stale, f"run `python -m tests.support.make_corpus`; stale: {stale[:5]}"


def test_cases_round_trip_through_their_files() -> None:
    for case in CASES:
        assert from_doc(json.loads(dump(case))) == case


@pytest.mark.parametrize("xkey", [False, True], ids=["plain", "sealed"])
def test_the_request_cases_are_built_from_is_admitted(xkey: bool) -> None:
    """The baseline the generator mutates, through the same core and record: admitted."""
    req = mc.request("baseline", xkey=xkey)
    token = req.token()
    payload = mc.seal(token, "baseline") if xkey else token
    headers = {forge.XKEY_HEADER: mc.SERVER.xkey_public} if xkey else None
    case = Case(
        name="baseline",
        group="",
        input="",
        payload=payload,
        headers=headers,
        now=mc.NOW,
        xkey=xkey,
        keys=mc.KEYS,
        users=mc.good_users(req),
        reason=d.ADMIT,
        answer="error",
        sub=req.user_nkey,
        aud=mc.SERVER.public,
        known_issue=None,
    )
    outcome = run_core(case)
    assert outcome.decision.reason == d.ADMIT, outcome.decision.detail
    assert isinstance(outcome.decision.request, Request)
    assert outcome.decision.request.client_key == req.client.public
    assert outcome.body is not None
    opened = forge.open_response(outcome.body, case.server, mc.KEYS["xkey_pub"] if xkey else None)
    claims = forge.decode_jwt(opened, nkeys.PREFIX_BYTE_ACCOUNT)
    assert claims["sub"] == req.user_nkey and "jwt" in claims["nats"]


def test_the_corpus_covers_what_the_issue_lists() -> None:
    names = {c.name for c in CASES}
    required = {
        "oversize_signed_request",
        "non_utf8_garbage",
        "non_utf8_in_claims",
        "two_segments",
        "four_segments",
        "padded_claims_segment",
        "alg_hs256",
        "typ_lowercase",
        "aud_response",
        "iss_other_server",
        "expired_60s",
        "not_yet_valid_60s",
        "deep_nesting_100k_arrays",
        "deep_nesting_40k_arrays",
        "exp_string",
        "exp_float",
        "exp_bool",
        "nats_list",
        "server_id_string",
        "user_nkey_int",
        "nonce_list",
        "sig_object",
        "user_nkey_missing",
        "user_nkey_bad_checksum",
        "plaintext_when_xkey_configured",
        "wrong_sender_key",
        "truncated_box",
        "header_without_box",
        "box_without_header",
        "sig_over_wrong_nonce",
        "record_pub_subject_with_space",
        "record_sub_queue_group",
        "record_account_sys",
        "record_account_callout",
        "record_unknown_key_publish",
        "record_duplicate_revoked",
        "kind_leafnode",
    }
    assert required <= names, sorted(required - names)
    # Every deny reason a hostile request or record can earn is reached at least once.
    hostile_reasons = UNADDRESSABLE | {
        d.XKEY_REQUIRED,
        d.NO_NKEY,
        d.BAD_NKEY,
        d.NO_SIGNATURE,
        d.BAD_SIGNATURE,
        d.KIND_NOT_ALLOWED,
        d.RECORD_INVALID,
        d.ACCOUNT_NOT_ALLOWED,
    }
    assert {c.reason for c in CASES} == hostile_reasons
    assert {c.answer for c in CASES} == {"empty", "error", "drop"}
    assert any(c.xkey and c.answer == "error" for c in CASES), "a sealed signed error"


def test_every_case_gives_its_client_a_valid_record() -> None:
    """So a check that a hostile input slipped past would show as an admit, not as
    `unknown_user` (records are the hostile part only in the record group)."""
    for case in CASES:
        assert case.users, case.name
        if case.group not in ("record",) and not case.name.startswith("sealed_record"):
            assert set(case.users.values()) == {json.dumps(mc.GOOD_RECORD)}, case.name


def test_docs_list_every_case_with_its_outcome() -> None:
    """docs/reliability.md's hostile-input table is the corpus's current outcome."""
    text = mc.DOCS.read_text()
    section = text[text.index(mc.BEGIN) : text.index(mc.END) + len(mc.END)]
    order = {c.name: i for i, c in enumerate(mc.build())}
    cases = tuple(sorted(CASES, key=lambda c: order[c.name]))
    assert section == mc.docs_section(cases), "run `python -m tests.support.make_corpus --docs`"
    for case in CASES:
        assert f"| `{case.name}` |" in section
