"""Evaluation against the examples of Ditto's policy documentation (basic-policy.html)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from policies import EXECUTE, MISSING, READ, WRITE, Enforcer, Policy, parse_policy

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def policy(entries: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> Policy:
    """Entries as label -> (subjects, resources)."""
    doc = {"entries": {k: {"subjects": s, "resources": r} for k, (s, r) in entries.items()}}
    return parse_policy(doc, "ns:p")


def view(p: Policy, *subjects: str, now: datetime = T0) -> Any:
    return Enforcer(p).view(subjects, now)


def res(grant: list[str] | None = None, revoke: list[str] | None = None) -> dict[str, list[str]]:
    return {"grant": grant or [], "revoke": revoke or []}


THING: dict[str, Any] = {
    "thingId": "ns:t",
    "policyId": "ns:p",
    "attributes": {"location": "Kitchen", "secret": "s3cr3t"},
    "features": {
        "f": {"properties": {"a": 1, "b": {"c": 2}}, "desiredProperties": {"a": 3}},
        "g": {"properties": {"x": [1, 2]}},
    },
}


def test_root_grant_and_deeper_revoke() -> None:
    v = view(
        policy(
            {
                "e": (
                    {"u:a": {}},
                    {"thing:/": res([READ, WRITE]), "thing:/attributes/secret": res(revoke=[READ])},
                )
            }
        ),
        "u:a",
    )
    assert v.has_permission("thing", [], READ)
    assert v.has_permission("thing", ["attributes", "location"], READ)
    assert not v.has_permission("thing", ["attributes", "secret"], READ)
    assert not v.has_permission("thing", ["attributes", "secret", "deeper"], READ)
    assert v.has_permission("thing", ["attributes", "secret"], WRITE)
    assert not v.has_unrestricted("thing", [], READ)
    assert not v.has_unrestricted("thing", ["attributes"], READ)
    assert v.has_unrestricted("thing", ["features"], READ)
    assert v.has_unrestricted("thing", [], WRITE)
    assert v.check("thing:/features/f", [READ, WRITE])
    assert not v.check("thing:/attributes", [READ, WRITE])
    expected = copy.deepcopy(THING)
    del expected["attributes"]["secret"]
    assert v.filter("thing", [], THING) == expected
    assert v.filter("thing", ["attributes"], THING["attributes"]) == {"location": "Kitchen"}
    assert v.filter("thing", ["attributes", "secret"], "s3cr3t") is MISSING


def test_deeper_grant_beneath_revoke() -> None:
    v = view(
        policy(
            {
                "e": (
                    {"u:a": {}},
                    {"thing:/": res(revoke=[READ]), "thing:/features/f/properties/a": res([READ])},
                )
            }
        ),
        "u:a",
    )
    assert not v.has_permission("thing", [], READ)
    assert v.has_permission("thing", ["features", "f", "properties", "a"], READ)
    assert not v.has_permission("thing", ["features", "f", "properties", "b"], READ)
    assert v.has_partial("thing", [], READ)
    assert v.has_partial("thing", ["features", "f"], READ)
    assert not v.has_partial("thing", ["features", "g"], READ)
    assert not v.has_partial("thing", ["attributes"], READ)
    # only one feature property readable: the view holds exactly features/f/properties/a
    assert v.filter("thing", [], THING) == {"features": {"f": {"properties": {"a": 1}}}}
    assert v.filter("thing", ["features", "f"], THING["features"]["f"]) == {"properties": {"a": 1}}


def test_write_does_not_imply_read() -> None:
    v = view(policy({"e": ({"u:a": {}}, {"thing:/": res([WRITE])})}), "u:a")
    assert v.has_unrestricted("thing", ["attributes"], WRITE)
    assert not v.has_permission("thing", [], READ)
    assert not v.has_partial("thing", [], READ)
    assert v.filter("thing", [], THING) is MISSING
    assert v.filter("thing", [], THING, WRITE) is THING
    assert not v.has_permission("thing", [], EXECUTE)


def test_revoke_in_one_entry_beats_grant_in_another_at_the_same_node() -> None:
    p = policy(
        {
            "owner": ({"u:a": {}}, {"thing:/": res([READ, WRITE])}),
            "restricted": (
                {"u:a": {}, "u:b": {}},
                {"thing:/features": res(revoke=[WRITE]), "thing:/": res(revoke=[READ])},
            ),
            "reader": ({"u:b": {}}, {"thing:/features": res([READ, WRITE])}),
        }
    )
    a = view(p, "u:a")
    assert not a.has_permission("thing", [], READ)  # revoke at the same node beats the grant
    assert a.has_permission("thing", [], WRITE)
    assert not a.has_permission("thing", ["features", "f"], WRITE)
    assert not a.has_unrestricted("thing", [], WRITE)
    b = view(p, "u:b")
    assert not b.has_permission("thing", ["features"], WRITE)
    assert b.has_permission("thing", ["features", "f"], READ)  # deeper grant beats the revoke above
    assert b.filter("thing", [], THING) == {"features": THING["features"]}
    assert b.filter("thing", [], THING)["features"] is THING["features"]  # fast path: no copy


def test_revoke_on_a_group_subject_applies_to_the_user() -> None:
    p = policy(
        {
            "user": ({"u:alice": {}}, {"thing:/": res([READ, WRITE])}),
            "interns": ({"group:interns": {}}, {"thing:/attributes": res(revoke=[READ, WRITE])}),
        }
    )
    alone = view(p, "u:alice")
    assert alone.has_unrestricted("thing", [], READ)
    assert alone.filter("thing", [], THING) is THING
    as_intern = view(p, "u:alice", "group:interns")
    assert as_intern.labels == {"user", "interns"}
    assert not as_intern.has_permission("thing", ["attributes", "location"], READ)
    assert not as_intern.check("thing:/", [WRITE])
    assert as_intern.check("thing:/features", [WRITE])
    assert "attributes" not in as_intern.filter("thing", [], THING)
    assert view(p, "group:interns").filter("thing", [], THING) is MISSING


def test_resource_types_are_separate() -> None:
    v = view(policy({"e": ({"u:a": {}}, {"policy:/": res([READ]), "message:/inbox": res([WRITE])})}), "u:a")
    assert v.has_permission("policy", ["entries"], READ)
    assert not v.has_permission("thing", [], READ)
    assert v.check("message:/inbox/messages/x", [WRITE])
    assert not v.check("message:/outbox", [WRITE])
    assert not v.has_permission("nonsense", [], READ)


def test_unknown_subjects_see_nothing() -> None:
    v = view(policy({"e": ({"u:a": {}}, {"thing:/": res([READ])})}), "u:b")
    assert not v.has_partial("thing", [], READ)
    assert v.filter("thing", [], THING) is MISSING
    assert view(policy({"e": ({"u:a": {}}, {"thing:/": res([READ])})})).labels == frozenset()


def test_expired_subject_no_longer_applies() -> None:
    expiry = T0 + timedelta(hours=1)
    p = policy(
        {
            "temp": ({"u:a": {"expiry": expiry.isoformat()}}, {"thing:/": res([READ])}),
            "other": ({"u:b": {}}, {"thing:/": res([WRITE])}),
        }
    )
    enforcer = Enforcer(p)
    assert enforcer.subjects() == {"u:a", "u:b"}
    before = enforcer.view(["u:a"], T0)
    assert before.has_permission("thing", [], READ)
    assert enforcer.view(["u:a"], T0 + timedelta(minutes=30)) is before  # cached until the expiry
    assert enforcer.view(["u:a"], expiry) is before  # still applies at the expiry instant
    after = enforcer.view(["u:a"], expiry + timedelta(microseconds=1))
    assert after is not before
    assert not after.has_permission("thing", [], READ)
    assert enforcer.view(["u:a"], expiry + timedelta(days=1)) is after  # expired for good
    # a caller asking with an earlier time again gets the right answer, not the cached one
    assert enforcer.view(["u:a"], T0).has_permission("thing", [], READ)
    # naive times are taken as UTC; the default is the current time
    assert enforcer.view(["u:a"], T0.replace(tzinfo=None)).has_permission("thing", [], READ)
    assert enforcer.view(["u:b"]).has_permission("thing", [], WRITE)


def test_expiry_of_one_subject_keeps_the_entry_for_another() -> None:
    p = policy(
        {"e": ({"u:a": {"expiry": "2026-01-01T01:00:00+00:00"}, "group:g": {}}, {"thing:/": res([READ])})}
    )
    late = T0 + timedelta(days=1)
    assert not view(p, "u:a", now=late).has_permission("thing", [], READ)
    assert view(p, "u:a", "group:g", now=late).has_permission("thing", [], READ)


def test_cache_is_per_subject_set_and_bounded() -> None:
    p = policy({"e": ({"u:a": {}}, {"thing:/": res([READ])})})
    enforcer = Enforcer(p, cache_size=2)
    first = enforcer.view(["u:a", "g:x"], T0)
    assert enforcer.view(("g:x", "u:a"), T0) is first
    enforcer.view(["u:b"], T0)
    enforcer.view(["u:c"], T0)
    assert enforcer.view(["u:a", "g:x"], T0) is not first  # evicted (least recently used)


def test_filter_rules() -> None:
    p = policy(
        {
            "e": (
                {"u:a": {}},
                {
                    "thing:/": res([READ]),
                    "thing:/features/f/properties": res(revoke=[READ]),
                    "thing:/features/f/properties/b/c": res([READ]),
                    "thing:/features/g/properties/x/0": res(revoke=[READ]),  # lists are leaves
                },
            )
        }
    )
    v = view(p, "u:a")
    original = copy.deepcopy(THING)
    out = v.filter("thing", [], THING)
    assert original == THING  # the input is not mutated
    assert out["features"]["f"] == {"properties": {"b": {"c": 2}}, "desiredProperties": {"a": 3}}
    assert out["features"]["g"] == THING["features"]["g"]  # the revoke inside a list is never reached
    assert out["attributes"] is THING["attributes"]
    # a readable dict whose children are all dropped stays as {}
    q = policy({"e": ({"u:a": {}}, {"thing:/": res([READ]), "thing:/attributes/secret": res(revoke=[READ])})})
    assert view(q, "u:a").filter("thing", ["attributes"], {"secret": 1}) == {}
    # scalars at the base
    assert v.filter("thing", ["features", "f", "properties", "b", "c"], 2) == 2
    assert v.filter("thing", ["features", "f", "properties", "a"], 1) is MISSING
    assert v.filter("thing", ["features", "f", "properties"], {"a": 1}) is MISSING


@pytest.mark.parametrize("permission", [READ, WRITE, EXECUTE])
def test_nothing_granted_is_missing(permission: str) -> None:
    v = view(policy({"e": ({"u:a": {}}, {})}), "u:a")
    assert v.filter("thing", [], THING, permission) is MISSING
    assert not MISSING
    assert repr(MISSING) == "MISSING"
