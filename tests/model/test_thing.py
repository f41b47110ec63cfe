"""decide / evolve: one command -> one event, revisions +1, snapshot + events == replay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import jsonpatch
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from twinstore.model.errors import DittoError, NotFoundError, ThingIdNotSettableError
from twinstore.model.thing import (
    Command,
    Delete,
    JsonPatch,
    Merge,
    Modify,
    ThingState,
    decide,
    evolve,
    replay,
)

T0 = datetime(2026, 1, 1, tzinfo=UTC)
THING = "org.test:thing"

keys = st.sampled_from(["a", "b", "c"])
values = st.none() | st.integers(-5, 5) | st.text(max_size=3) | st.lists(st.integers(0, 3), max_size=3)
nested = st.recursive(values, lambda c: st.dictionaries(keys, c, max_size=3), max_leaves=6)
pointers = st.sampled_from(
    [
        "/attributes",
        "/attributes/a",
        "/attributes/a/b",
        "/features/f",
        "/features/f/properties",
        "/features/f/properties/a",
        "/features/g/properties/b/c",
        "/features/f/desiredProperties/a",
        "/definition",
    ]
)


def command_strategy() -> st.SearchStrategy[Command]:
    modify = st.builds(lambda p, v: Modify(path=p, value=v), pointers, nested)
    merge = st.builds(
        lambda p, v: Merge(path=p, value=v), pointers, st.dictionaries(keys, nested, max_size=2)
    )
    delete = st.builds(lambda p: Delete(path=p), pointers)
    root = st.just(Modify(path="/", value={"attributes": {"a": 1}, "features": {"f": {"properties": {}}}}))
    patch = st.builds(
        lambda k, v: JsonPatch(path="/attributes", value=[{"op": "add", "path": "/" + k, "value": v}]),
        keys,
        nested,
    )
    return modify | merge | delete | root | patch


def run(commands: list[Command]) -> tuple[ThingState, list[Any], list[ThingState]]:
    state = ThingState.absent(THING)
    events, states = [], [state]
    for i, command in enumerate(commands):
        try:
            event = decide(state, command, T0 + timedelta(seconds=i))
        except DittoError:
            continue
        state = evolve(state, event)
        events.append(event)
        states.append(state)
    return state, events, states


@settings(max_examples=200)
@given(st.lists(command_strategy(), max_size=25))
def test_each_success_is_one_event_and_revision_plus_one(commands: list[Command]) -> None:
    state, events, states = run([Modify(path="/", value={}), *commands])
    assert [e.revision for e in events] == list(range(1, len(events) + 1))
    assert [s.revision for s in states] == list(range(0, len(events) + 1))
    assert state.revision == len(events)


@settings(max_examples=200)
@given(st.lists(command_strategy(), max_size=25), st.integers(0, 25))
def test_snapshot_plus_later_events_equals_full_replay(commands: list[Command], cut: int) -> None:
    final, events, states = run([Modify(path="/", value={}), *commands])
    cut = min(cut, len(events))
    snapshot = states[cut]
    assert replay(snapshot, events[cut:]) == replay(ThingState.absent(THING), events) == final


@given(st.dictionaries(keys, nested, max_size=3), st.lists(st.tuples(keys, nested), min_size=1, max_size=3))
def test_json_patch_command_agrees_with_jsonpatch(attrs: dict[str, Any], adds: list[tuple[str, Any]]) -> None:
    state = evolve(
        ThingState.absent(THING),
        decide(ThingState.absent(THING), Modify(path="/", value={"attributes": attrs}), T0),
    )
    ops = [{"op": "add", "path": "/attributes/" + k, "value": v} for k, v in adds]
    event = decide(state, JsonPatch(path="/", value=ops), T0)
    expected = jsonpatch.JsonPatch(ops).apply(state.doc, in_place=False)
    assert evolve(state, event).doc == expected


def test_feature_must_exist_for_its_properties() -> None:
    state = evolve(ThingState.absent(THING), decide(ThingState.absent(THING), Modify(path="/", value={}), T0))
    with pytest.raises(NotFoundError) as err:
        decide(state, Modify(path="/features/f/properties/a", value=1), T0)
    assert err.value.instance_error == "things:feature.notfound"


def test_a_merge_creates_a_missing_feature() -> None:
    """As Ditto's MergeThing: the patch is ``{path: value}`` merged into the whole thing."""
    state = evolve(ThingState.absent(THING), decide(ThingState.absent(THING), Modify(path="/", value={}), T0))
    event = decide(state, Merge(path="/features/connectivity/properties/status", value="online"), T0)
    assert evolve(state, event).doc == {
        "thingId": THING,
        "policyId": THING,
        "features": {"connectivity": {"properties": {"status": "online"}}},
    }


def test_thing_id_in_body_must_match() -> None:
    with pytest.raises(ThingIdNotSettableError):
        decide(ThingState.absent(THING), Modify(path="/", value={"thingId": "org.test:other"}), T0)


def test_new_thing_gets_default_policy() -> None:
    event = decide(ThingState.absent(THING), Modify(path="/", value={}), T0)
    assert event.value == {"thingId": THING, "policyId": THING}


def test_delete_then_recreate_continues_revisions() -> None:
    s = ThingState.absent(THING)
    for command in (Modify(path="/", value={}), Delete(path="/"), Modify(path="/", value={})):
        s = evolve(s, decide(s, command, T0))
    assert s.revision == 3 and s.exists


odd_values = (
    values
    | st.dictionaries(st.sampled_from(["a", "a/b", "", "properties", "definition"]), values, max_size=2)
    | st.lists(st.sampled_from(["ns:n:1", "bad def", 3]), max_size=2)
)


@settings(max_examples=300)
@given(pointers, st.recursive(odd_values, lambda c: st.dictionaries(keys, c, max_size=2), max_leaves=4))
def test_validating_the_value_in_place_agrees_with_the_whole_document(pointer: str, value: Any) -> None:
    from twinstore.model import patch as jp
    from twinstore.model.ids import parse_pointer
    from twinstore.model.thing import validate_thing, validate_value

    base = {"thingId": THING, "attributes": {"a": 1}, "features": {"f": {"properties": {}}, "g": {}}}
    parts = parse_pointer(pointer)

    def outcome(check: Any) -> type | None:
        try:
            check()
        except DittoError as exc:
            return type(exc)
        return None

    whole = outcome(lambda: validate_thing(jp.set_at(base, parts, value), THING))
    in_place = outcome(lambda: validate_value(parts, value, THING))
    assert whole == in_place
