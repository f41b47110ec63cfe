"""Parsing, validation and the canonical JSON form of policies."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from policies import (
    PolicyInvalidError,
    ResourcePermissions,
    parse_entry,
    parse_policy,
    parse_resource_key,
)

DITTO_EXAMPLE: dict[str, Any] = {
    "policyId": "ns:name",
    "entries": {
        "DEFAULT": {
            "subjects": {"nginx:ditto": {"type": "generated", "expiry": "2026-12-01T00:00:00Z"}},
            "resources": {
                "thing:/": {"grant": ["READ", "WRITE"], "revoke": []},
                "thing:/features/f/properties/secret": {"grant": [], "revoke": ["READ"]},
                "policy:/": {"grant": ["READ", "WRITE"], "revoke": []},
                "message:/": {"grant": ["READ", "WRITE"], "revoke": []},
            },
            "importable": "implicit",
        },
        "observer": {
            "subjects": {"group:observers": {"type": "group", "announcement": {"beforeExpiry": "1h"}}},
            "resources": {"thing:/features": {"grant": ["READ"], "revoke": ["WRITE"]}},
            "namespaces": ["ns"],
            "allowedImportAdditions": ["subjects"],
        },
    },
    "imports": {"ns:template": {"entries": ["DEFAULT"]}},
}


def entry(resources: dict[str, Any], subjects: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"subjects": subjects if subjects is not None else {"u:a": {}}, "resources": resources}


def test_round_trip_of_a_canonical_policy() -> None:
    policy = parse_policy(copy.deepcopy(DITTO_EXAMPLE), "ns:name")
    assert policy.to_json() == DITTO_EXAMPLE
    assert parse_policy(policy.to_json(), "ns:name") == policy


def test_parsed_fields() -> None:
    policy = parse_policy(DITTO_EXAMPLE, "ns:name")
    default = policy.entries["DEFAULT"]
    subject = default.subjects["nginx:ditto"]
    assert subject.type == "generated"
    assert subject.expires_at == datetime(2026, 12, 1, tzinfo=UTC)
    assert default.extra == {"importable": "implicit"}
    assert default.resources["thing:/features/f/properties/secret"] == ResourcePermissions(
        "thing", ("features", "f", "properties", "secret"), (), ("READ",)
    )
    assert policy.entries["observer"].subjects["group:observers"].extra == {
        "announcement": {"beforeExpiry": "1h"}
    }


def test_canonical_form_fills_in_missing_arrays_and_normalises_keys() -> None:
    doc = {
        "entries": {
            "e": entry(
                {"thing:/a/": {"grant": ["READ", "READ"]}, "thing:/a": {"revoke": ["WRITE"]}, "thing:": {}}
            )
        }
    }
    with pytest.raises(PolicyInvalidError):  # "thing:" has no path
        parse_policy(doc, "ns:p")
    del doc["entries"]["e"]["resources"]["thing:"]
    out = parse_policy(doc, "ns:p").to_json()
    assert out == {
        "policyId": "ns:p",
        "entries": {
            "e": {
                "subjects": {"u:a": {}},
                "resources": {"thing:/a": {"grant": ["READ"], "revoke": ["WRITE"]}},
            }
        },
    }


def test_empty_entries_and_underscore_fields() -> None:
    policy = parse_policy({"policyId": "ns:p", "entries": {}, "_revision": 3}, "ns:p")
    assert policy.to_json() == {"policyId": "ns:p", "entries": {}}


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("thing:/", ("thing", ())),
        ("thing:/features/f/", ("thing", ("features", "f"))),
        ("thing://features//f", ("thing", ("features", "f"))),
        ("policy:/entries", ("policy", ("entries",))),
        ("message:/inbox/messages/x", ("message", ("inbox", "messages", "x"))),
    ],
)
def test_parse_resource_key(key: str, expected: tuple[str, tuple[str, ...]]) -> None:
    assert parse_resource_key(key) == expected


@pytest.mark.parametrize(
    ("key", "fragment"),
    [
        ("things:/", "unknown type 'things'"),
        ("thing", "must have the form"),
        ("thing:features", "path starting with '/'"),
        ("thing:/a\x00b", "control characters"),
        (":/", "unknown type ''"),
    ],
)
def test_bad_resource_keys(key: str, fragment: str) -> None:
    with pytest.raises(PolicyInvalidError) as info:
        parse_resource_key(key)
    assert info.value.error == "policies:entry.invalid"
    assert fragment in info.value.message


def invalid(doc: object, policy_id: str = "ns:p") -> PolicyInvalidError:
    with pytest.raises(PolicyInvalidError) as info:
        parse_policy(doc, policy_id)
    assert str(info.value) == info.value.message
    return info.value


@pytest.mark.parametrize(
    ("doc", "error", "fragments"),
    [
        (
            {"entries": {"e": entry({"thing:/": {"grant": ["READ", "DELETE"]}})}},
            "policies:entry.invalid",
            ["unknown permission 'DELETE'", "'grant'", "thing:/", "entry 'e'"],
        ),
        (
            {"entries": {"e": entry({"thing:/": {"revoke": ["read"]}})}},
            "policies:entry.invalid",
            ["unknown permission 'read'", "'revoke'"],
        ),
        (
            {"entries": {"e": entry({"feature:/": {"grant": ["READ"]}})}},
            "policies:entry.invalid",
            ["unknown type 'feature'"],
        ),
        (
            {"entries": {"e": entry({"thing:attributes": {"grant": ["READ"]}})}},
            "policies:entry.invalid",
            ["'thing:attributes'", "starting with '/'"],
        ),
        (
            {"entries": {"e": entry({"thing:/": {"grant": ["READ"], "deny": []}})}},
            "policies:entry.invalid",
            ["unknown field(s) deny", "entry 'e'"],
        ),
        ({"entries": {"a/b": entry({})}}, "policies:label.invalid", ["'a/b'", "'/'"]),
        ({"entries": {"": entry({})}}, "policies:label.invalid", ["''"]),
        ({"entries": {"a\nb": entry({})}}, "policies:label.invalid", ["control"]),
        (
            {"entries": {"e": entry({}, {"nginxditto": {}})}},
            "policies:subjectid.invalid",
            ["'nginxditto'", "entry 'e'", "<issuer>:<subject>"],
        ),
        ({"entries": {"e": entry({}, {":x": {}})}}, "policies:subjectid.invalid", ["':x'"]),
        (
            {"entries": {"e": entry({}, {"u:a": {"expiry": "tomorrow"}})}},
            "policies:subjectexpiry.invalid",
            ["'tomorrow'", "subject 'u:a'", "entry 'e'"],
        ),
        (
            {"entries": {"e": entry({}, {"u:a": {"expiry": "2026-01-01T00:00:00"}})}},
            "policies:subjectexpiry.invalid",
            ["with offset"],
        ),
        # wrong JSON types
        ([], "json.invalid", ["Policy must be a JSON object, not an array"]),
        ({"entries": []}, "json.invalid", ["'entries'", "an array"]),
        ({"entries": {"e": "x"}}, "json.invalid", ["Entry 'e'", "a string"]),
        ({"entries": {"e": {"subjects": [], "resources": {}}}}, "json.invalid", ["'subjects' of entry 'e'"]),
        ({"entries": {"e": {"subjects": {}, "resources": []}}}, "json.invalid", ["'resources' of entry 'e'"]),
        ({"entries": {"e": entry({}, {"u:a": "x"})}}, "json.invalid", ["Subject 'u:a' of entry 'e'"]),
        ({"entries": {"e": entry({}, {"u:a": {"type": 1}})}}, "json.invalid", ["'type' of subject 'u:a'"]),
        ({"entries": {"e": entry({}, {"u:a": {"expiry": 5}})}}, "json.invalid", ["'expiry' of subject"]),
        ({"entries": {"e": entry({"thing:/": []})}}, "json.invalid", ["Resource 'thing:/' of entry 'e'"]),
        ({"entries": {"e": entry({"thing:/": {"grant": "READ"}})}}, "json.invalid", ["'grant'", "a string"]),
        ({"entries": {"e": entry({"thing:/": {"grant": [1]}})}}, "json.invalid", ["'grant'", "a number"]),
        # missing fields, wrong id
        ({}, "json.field.missing", ["'entries'"]),
        ({"entries": {"e": {"subjects": {}}}}, "json.field.missing", ["Entry 'e'", "'resources'"]),
        ({"entries": {"e": {"resources": {}}}}, "json.field.missing", ["'subjects'"]),
        ({"policyId": "ns:q", "entries": {}}, "policies:id.notsettable", ["'ns:q'", "'ns:p'"]),
        ({"policyId": 1, "entries": {}}, "policies:id.notsettable", ["1"]),
    ],
)
def test_validation_errors(doc: object, error: str, fragments: list[str]) -> None:
    exc = invalid(doc)
    assert exc.error == error, exc.message
    for fragment in fragments:
        assert fragment in exc.message


def test_parse_entry_validates_a_single_entry() -> None:
    e = parse_entry("owner", entry({"thing:/": {"grant": ["WRITE"]}}))
    assert e.label == "owner" and set(e.subjects) == {"u:a"}
    with pytest.raises(PolicyInvalidError) as info:
        parse_entry("owner", entry({"thing:/": {"grant": ["EXEC"]}}))
    assert info.value.error == "policies:entry.invalid"
    assert isinstance(info.value, ValueError)


def test_parsing_does_not_mutate_the_input() -> None:
    doc = copy.deepcopy(DITTO_EXAMPLE)
    parse_policy(doc, "ns:name")
    assert doc == DITTO_EXAMPLE
