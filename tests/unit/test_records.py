"""callout.records: the user record is untrusted input; every bad field denies, with its name."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from callout.records import (
    MAX_NAME_LENGTH,
    MAX_RECORD_BYTES,
    MAX_SUBJECT_LENGTH,
    MAX_SUBJECTS,
    UNRESTRICTED,
    Permissions,
    RecordError,
    Rules,
    UserRecord,
    account_problem,
    dump_record,
    parse_permissions,
    parse_record,
    subject_problem,
)
from tests.support.service import record


def _parse(doc: Any) -> UserRecord:
    return parse_record(orjson.dumps(doc))


def _error(doc: Any) -> str:
    with pytest.raises(RecordError) as info:
        _parse(doc)
    return str(info.value)


# ---------------------------------------------------------------------------------------------
# shape and defaults
# ---------------------------------------------------------------------------------------------
def test_defaults() -> None:
    assert _parse({}) == UserRecord()
    assert UserRecord() == UserRecord(
        name="", admin=False, revoked=False, account=None, permissions=UNRESTRICTED
    )
    assert _parse({"account": None, "permissions": None}) == UserRecord()
    assert _parse({"permissions": {}}).permissions == UNRESTRICTED
    assert _parse({"permissions": {"pub": None, "sub": {}}}).permissions == UNRESTRICTED
    assert _parse({"permissions": {"pub": {"allow": None, "deny": []}}}).permissions == UNRESTRICTED


def test_full_record() -> None:
    data = record(
        "alice",
        admin=True,
        revoked=True,
        account="OTHER",
        pub_allow=["a.>", "b.*.c"],
        pub_deny=["a.secret"],
        sub_allow=["_INBOX.>"],
        sub_deny=[">"],
    )
    parsed = parse_record(data)
    assert parsed == UserRecord(
        name="alice",
        admin=True,
        revoked=True,
        account="OTHER",
        permissions=Permissions(
            pub=Rules(("a.>", "b.*.c"), ("a.secret",)), sub=Rules(("_INBOX.>",), (">",))
        ),
    )
    assert parse_record(dump_record(parsed)) == parsed
    assert orjson.loads(dump_record(parsed)) == orjson.loads(data)


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        # nats-server's own spelling: ignored, the lists came out empty = unrestricted.
        ({"permissions": {"publish": {"allow": ["a.>"]}}}, "'permissions.publish'"),
        ({"permissions": {"subscribe": {"allow": ["a.>"]}}}, "'permissions.subscribe'"),
        ({"permissions": {"pub": {"Allow": ["a.>"]}}}, "'permissions.pub.Allow'"),
        ({"permissions": {"sub": {"allow": ["a"], "deny ": ["b"]}}}, "'permissions.sub.deny '"),
        ({"permissions": {"pub": {"allow": ["x"]}, "resp": {"max": 1}}}, "'permissions.resp'"),
        ({"Revoked": True}, "'Revoked'"),
        ({"name": "bob", "email": "bob@example.com"}, "'email'"),
        ({"pub": {"allow": ["a.>"]}}, "'pub'"),
    ],
)
def test_unknown_fields_are_errors_that_name_them(doc: dict[str, Any], field: str) -> None:
    assert f"unknown field {field}" in _error(doc)


@pytest.mark.parametrize(
    "data",
    [
        b'{"revoked": true, "revoked": false}',
        b'{"permissions": {"pub": {"allow": ["a"], "allow": []}}}',
        b'{"permissions": {"pub": {"allow": ["a"]}, "pub": {}}}',
        b'{"meta": {"owner": "a", "owner": "b"}}',
    ],
)
def test_duplicate_keys_are_errors(data: bytes) -> None:
    # orjson (and most parsers) keep the last value silently: the first could be the one the
    # writer meant, so neither is taken.
    with pytest.raises(RecordError, match="twice in one object"):
        parse_record(data)


def test_meta_holds_a_control_plane_s_own_data_and_is_never_read() -> None:
    parsed = _parse({"name": "bob", "meta": {"email": "bob@example.com", "revoked": True}})
    assert parsed == UserRecord(name="bob")
    assert "meta must be an object" in _error({"meta": ["x"]})
    assert _parse({"meta": None}) == UserRecord()


def test_keep_sessions_is_a_record_field() -> None:
    assert _parse({"revoked": True, "keep_sessions": True}).keep_sessions is True
    assert "keep_sessions must be bool" in _error({"keep_sessions": "yes"})
    assert "keep_sessions" not in orjson.loads(dump_record(UserRecord()))
    kept = UserRecord(revoked=True, keep_sessions=True)
    assert parse_record(dump_record(kept)) == kept


@pytest.mark.parametrize(
    "text", ['{"pub": {"allow": ["a"]}, "pub": {}}', '{"publish": {"allow": ["a"]}}', "NaN"]
)
def test_permission_flags_are_as_strict_as_records(text: str) -> None:
    from callout.errors import UserError
    from callout.settings import permissions_json

    with pytest.raises(UserError) as info:
        permissions_json(text, "--default-permissions")
    assert "--default-permissions" in str(info.value)


@pytest.mark.parametrize("data", [b"", b"not json", b"{", b"\xff", b"{'a': 1}"])
def test_not_json(data: bytes) -> None:
    with pytest.raises(RecordError, match="not JSON"):
        parse_record(data)


@pytest.mark.parametrize("doc", [[], "x", 1, None, True])
def test_not_an_object(doc: Any) -> None:
    assert _error(doc) == "record is not a JSON object"


def test_size_cap() -> None:
    padding = "x" * (MAX_RECORD_BYTES - len(b'{"meta":{"pad":""}}'))
    at_cap = orjson.dumps({"meta": {"pad": padding}})
    assert len(at_cap) == MAX_RECORD_BYTES
    assert parse_record(at_cap) == UserRecord()
    with pytest.raises(RecordError, match="larger than"):
        parse_record(orjson.dumps({"meta": {"pad": padding + "x"}}))


# ---------------------------------------------------------------------------------------------
# field types
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("name", 1),
        ("name", None),
        ("name", ["alice"]),
        ("name", True),
        ("admin", "true"),
        ("admin", 1),
        ("admin", 0),
        ("admin", None),
        ("revoked", "false"),
        ("revoked", 1),
        ("revoked", None),
        ("revoked", {}),
    ],
)
def test_scalar_type_errors(field: str, value: Any) -> None:
    assert _error({field: value}).startswith(f"{field} must be")


def test_booleans_parse() -> None:
    assert _parse({"admin": True, "revoked": False}) == UserRecord(admin=True)
    assert _parse({"admin": False, "revoked": True}) == UserRecord(revoked=True)


def test_name_bounds() -> None:
    assert _parse({"name": "n" * MAX_NAME_LENGTH}).name == "n" * MAX_NAME_LENGTH
    assert "name must be printable" in _error({"name": "n" * (MAX_NAME_LENGTH + 1)})
    assert "name must be printable" in _error({"name": "line\nbreak"})
    assert "name must be printable" in _error({"name": "bell\x07"})
    assert _parse({"name": "Zoë Smith"}).name == "Zoë Smith"  # spaces and unicode are fine


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (1, "account must be a non-empty string"),
        ("", "account must be a non-empty string"),
        (["APP"], "account must be a non-empty string"),
        (False, "account must be a non-empty string"),
        ("MY APP", "account must be printable"),
        ("APP\t", "account must be printable"),
        ("APP\x00", "account must be printable"),
        ("A" * (MAX_NAME_LENGTH + 1), "account must be printable"),
    ],
)
def test_account_validation(value: Any, problem: str) -> None:
    assert _error({"account": value}).startswith(problem)


def test_account_problem() -> None:
    assert account_problem("APP") is None
    assert account_problem("$G") is None
    assert account_problem("A" * MAX_NAME_LENGTH) is None
    assert _parse({"account": "OTHER"}).account == "OTHER"
    assert account_problem(None) is not None
    assert account_problem("a b") is not None


@pytest.mark.parametrize(
    ("permissions", "where"),
    [
        ([], "permissions must be an object"),
        ("all", "permissions must be an object"),
        ({"pub": []}, "permissions.pub must be an object"),
        ({"sub": "x"}, "permissions.sub must be an object"),
        ({"pub": {"allow": "x"}}, "permissions.pub.allow must be a list"),
        ({"sub": {"deny": {"x": 1}}}, "permissions.sub.deny must be a list"),
        ({"pub": {"deny": [1]}}, "permissions.pub.deny[0]: not a string"),
        ({"sub": {"allow": ["ok", None]}}, "permissions.sub.allow[1]: not a string"),
    ],
)
def test_permission_type_errors(permissions: Any, where: str) -> None:
    assert _error({"permissions": permissions}) == where


def test_error_names_the_bad_subject() -> None:
    message = _error({"permissions": {"sub": {"deny": ["a", "b", "c..d"]}}})
    assert message.startswith("permissions.sub.deny[2]: empty token")
    assert parse_permissions(None) == UNRESTRICTED
    with pytest.raises(RecordError, match=r"^--internal-permissions\.pub\.allow\[0\]"):
        parse_permissions({"pub": {"allow": ["a b"]}}, "--internal-permissions")


# ---------------------------------------------------------------------------------------------
# subjects
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "subject",
    [
        "foo",
        "foo.bar",
        "*",
        ">",
        "foo.*",
        "foo.>",
        "foo.*.bar",
        "*.*.>",
        "_INBOX.>",
        "$SYS.REQ.USER.INFO",
        "ünïcode.topic",
        "a-b_c:d",
        "x" * MAX_SUBJECT_LENGTH,
    ],
)
def test_valid_subjects(subject: str) -> None:
    assert subject_problem(subject) is None
    assert _parse({"permissions": {"pub": {"allow": [subject]}}}).permissions.pub.allow == (
        subject,
    )


@pytest.mark.parametrize(
    ("subject", "problem"),
    [
        (None, "not a string"),
        (3, "not a string"),
        ("", "empty"),
        ("foo bar", "whitespace"),
        ("foo q1", "queue groups are not supported"),
        ("foo\tbar", "whitespace"),
        ("foo\nbar", "whitespace"),
        (" foo", "whitespace"),
        ("foo\x00", "control characters"),
        ("foo\x1b[31m", "control characters"),
        ("foo\x7f", "control characters"),
        ("foo\u00a0bar", "control characters"),
        ("foo\u2028", "control characters"),
        (".foo", "empty token"),
        ("foo.", "empty token"),
        ("foo..bar", "empty token"),
        (".", "empty token"),
        ("foo.>.bar", "'>' must be the whole last token"),
        (">.foo", "'>' must be the whole last token"),
        ("foo>", "'>' must be the whole last token"),
        ("foo.>>", "'>' must be the whole last token"),
        ("foo.b>", "'>' must be the whole last token"),
        ("fo*", "'*' must be a whole token"),
        ("foo.*a", "'*' must be a whole token"),
        ("foo.**", "'*' must be a whole token"),
        ("x" * (MAX_SUBJECT_LENGTH + 1), "too long"),
    ],
)
def test_invalid_subjects(subject: Any, problem: str) -> None:
    found = subject_problem(subject)
    assert found is not None and problem in found
    for direction in ("pub", "sub"):
        for rule in ("allow", "deny"):
            message = _error({"permissions": {direction: {rule: ["ok", subject]}}})
            assert message.startswith(f"permissions.{direction}.{rule}[1]: ")
            assert problem in message


def test_too_many_subjects() -> None:
    at_limit = [f"s.{i}" for i in range(MAX_SUBJECTS)]
    parsed = _parse({"permissions": {"sub": {"allow": at_limit}}})
    assert len(parsed.permissions.sub.allow) == MAX_SUBJECTS
    message = _error({"permissions": {"sub": {"allow": [*at_limit, "one.more"]}}})
    assert message == f"permissions.sub.allow has more than {MAX_SUBJECTS} subjects"


# ---------------------------------------------------------------------------------------------
# what the user JWT gets
# ---------------------------------------------------------------------------------------------
def test_permission_claims_omit_empty_lists() -> None:
    assert UNRESTRICTED.claims() == {}
    assert Permissions(pub=Rules(deny=("x",))).claims() == {"pub": {"deny": ["x"]}}
    both = Permissions(pub=Rules(("a",), ("b",)), sub=Rules(("c",)))
    assert both.claims() == {"pub": {"allow": ["a"], "deny": ["b"]}, "sub": {"allow": ["c"]}}
    assert both.as_json()["sub"] == {"allow": ["c"], "deny": []}


# ---------------------------------------------------------------------------------------------
# coverage: is one grant at least as wide as another?
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("wide", "narrow", "covers"),
    [
        ("a", "a", True),
        ("a", "b", False),
        ("a.*", "a.b", True),
        ("a.*", "a.*", True),
        ("a.*", "a.>", False),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b", True),
        ("a.>", "a.b.c", True),
        ("a.>", "a.*", True),
        ("a.>", "a.>", True),
        ("a.>", "a", False),
        (">", "a", True),
        (">", ">", True),
        ("a", "*", False),
        ("a.b", "a.>", False),
        ("*.b", "a.b", True),
        ("*.b", "a.c", False),
    ],
)
def test_subject_covers(wide: str, narrow: str, covers: bool) -> None:
    from callout.records import subject_covers

    assert subject_covers(wide, narrow) is covers


def test_permissions_cover_only_what_they_provably_contain() -> None:
    unrestricted = Permissions()
    orders = Permissions(pub=Rules(("orders.>",), ("orders.secret",)))
    assert unrestricted.covers(orders) and unrestricted.covers(unrestricted)
    assert not orders.covers(unrestricted)
    assert orders.covers(orders)
    assert Permissions(pub=Rules(("orders.>",))).covers(orders)  # less denied
    assert not Permissions(pub=Rules(("orders.>",), ("orders.*",))).covers(orders)  # more
    assert Permissions(pub=Rules((), ("orders.secret",))).covers(orders)  # no allow list
    assert not Permissions(sub=Rules(("x",))).covers(orders)  # sub narrowed from everything
