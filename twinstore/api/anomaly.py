"""Anomaly detection under a feature (a twinstore extension; Ditto has no such resource).

``/api/2/things/{thingId}/features/{featureId}/anomaly``:

* ``/detector``: ``PUT`` (201 / 204) ``{"algorithm", "parameters", "properties"}``, ``GET``,
  ``DELETE`` (204) — WRITE on ``thing:/features/{featureId}`` to put or delete, READ to get;
* ``GET`` (no suffix): the latest score ``{"score", "threshold", "anomalous", "revision",
  "timestamp", "algorithm"}``;
* ``/anomalies``: ``GET ?from=&to=&size=&cursor=`` newest first, ``{"items", "cursor"}``;
* ``/anomalies/{revision}/label``: ``PUT "confirmed" | "false-alarm"`` (WRITE).

As everywhere in Ditto, a feature the caller may not read looks absent (404); readable but
not writable is 403.

``/api/2/anomaly/definitions/{definition}``: a detector for every feature with that definition
that the caller may WRITE (:mod:`twinstore.anomaly.rules`): ``PUT`` (201 with the rule / 204;
header ``twinstore-attached``: detectors attached now), ``GET``, ``DELETE`` (204, removes the
detectors it attached); ``GET /api/2/anomaly/definitions`` lists the caller's rules. A rule is
visible to, and changed by, callers who share a subject with the one who put it; rules are per
owner, so another caller's rule for a definition neither shows nor stops a caller's own.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from litestar import Request, Response, delete, get, put
from litestar.handlers import HTTPRouteHandler

from policies import READ, WRITE
from twinstore.anomaly import rules, store
from twinstore.api.auth import authenticate
from twinstore.api.headers import correlation_id, header_value
from twinstore.api.things import JSON, json_response, read_json
from twinstore.auth import AuthContext
from twinstore.model.errors import (
    InvalidInputError,
    NotFoundError,
    not_found,
    not_modifiable,
)
from twinstore.model.ids import validate_thing_id
from twinstore.runtime import Runtime

__all__ = ["anomaly_handlers"]

F = "/api/2/things/{thingId:str}/features/{featureId:str}/anomaly"
D = "/api/2/anomaly/definitions"
TAGS = ["Anomaly detection (twinstore)"]
MAX_SIZE = 200
DEFAULT_SIZE = 25


def _detector_not_found(thing_id: str, feature_id: str) -> NotFoundError:
    return NotFoundError(
        f"The Feature '{feature_id}' of the Thing with ID '{thing_id}' has no anomaly detector.",
        error="things:anomaly.detector.notfound",
        description="Attach one with PUT .../anomaly/detector.",
    )


async def _access(request: Request[Any, Any, Any], *, write: bool) -> tuple[Runtime, AuthContext, str, str]:
    """The runtime, caller, thing and feature, after checking READ (or WRITE) on the feature."""
    auth = await authenticate(request)
    runtime: Runtime = request.app.state.runtime
    assert runtime.journal is not None and runtime.service is not None
    thing_id = validate_thing_id(request.path_params["thingId"])
    feature_id = str(request.path_params["featureId"])
    state = await runtime.journal.load(thing_id)
    policy_id = (state.doc or {}).get("policyId")
    view = await runtime.service.cache.view(policy_id, auth.subjects) if isinstance(policy_id, str) else None
    if view is None or state.doc is None or not view.has_partial("thing", [], READ):
        raise not_found(thing_id, [])
    parts = ["features", feature_id]
    if not view.has_unrestricted("thing", parts, READ):
        raise not_found(thing_id, parts)
    if write and not view.has_unrestricted("thing", parts, WRITE):
        raise not_modifiable(thing_id, parts)
    if write and feature_id not in (state.doc.get("features") or {}):
        raise not_found(thing_id, parts)
    return runtime, auth, thing_id, feature_id


def _pool(runtime: Runtime) -> Any:
    assert runtime.pool is not None
    return runtime.pool


async def put_detector(request: Request[Any, Any, Any]) -> Response[bytes]:
    runtime, _, thing_id, feature_id = await _access(request, write=True)
    config = store.validate_config(await read_json(request, (JSON,)))
    assert runtime.recorder is not None
    partition = runtime.recorder.partition(thing_id)
    created = await store.put_detector(_pool(runtime), partition, thing_id, feature_id, config)
    if runtime.anomaly is not None:
        runtime.anomaly.invalidate()  # this process's scorers watch the thing from now on
    if created:
        return json_response(201, _shown(config), {"location": header_value(str(request.url).split("?")[0])})
    return json_response(204)


def _shown(config: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if v is not None}


async def get_detector(request: Request[Any, Any, Any]) -> Response[bytes]:
    runtime, _, thing_id, feature_id = await _access(request, write=False)
    row = await store.get_detector(_pool(runtime), thing_id, feature_id)
    if row is None:
        raise _detector_not_found(thing_id, feature_id)
    return json_response(200, _shown(row["config"]))


async def delete_detector(request: Request[Any, Any, Any]) -> Response[bytes]:
    runtime, _, thing_id, feature_id = await _access(request, write=True)
    assert runtime.recorder is not None
    partition = runtime.recorder.partition(thing_id)
    if not await store.delete_detector(_pool(runtime), partition, thing_id, feature_id):
        raise _detector_not_found(thing_id, feature_id)
    if runtime.anomaly is not None:
        runtime.anomaly.invalidate()
    return json_response(204)


def _iso(ts: datetime | None) -> str | None:
    return None if ts is None else ts.isoformat().replace("+00:00", "Z")


async def get_latest(request: Request[Any, Any, Any]) -> Response[bytes]:
    runtime, _, thing_id, feature_id = await _access(request, write=False)
    row = await store.latest(_pool(runtime), thing_id, feature_id)
    if row is None:
        raise NotFoundError(
            f"The Feature '{feature_id}' of the Thing with ID '{thing_id}' has no anomaly score yet.",
            error="things:anomaly.notfound",
            description="Attach a detector (PUT .../anomaly/detector) and update the feature's properties.",
        )
    return json_response(
        200,
        {
            "score": store.finite(row["score"]),
            "threshold": store.finite(row["threshold"]),
            "anomalous": row["anomalous"],
            "revision": row["revision"],
            "timestamp": _iso(row["scored_at"]),
            "algorithm": row["config"]["algorithm"],
        },
    )


def _time(request: Request[Any, Any, Any], name: str) -> datetime | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        ts = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidInputError(
            f"The parameter {name!r} must be an ISO-8601 timestamp, not {text!r}."
        ) from None
    if ts.tzinfo is None:
        raise InvalidInputError(f"The parameter {name!r} needs a time zone (e.g. 'Z'), not {text!r}.")
    return ts


async def list_anomalies(request: Request[Any, Any, Any]) -> Response[bytes]:
    runtime, _, thing_id, feature_id = await _access(request, write=False)
    size_text = request.query_params.get("size", str(DEFAULT_SIZE))
    if not size_text.isdigit() or not 1 <= int(size_text) <= MAX_SIZE:
        raise InvalidInputError(f"The parameter 'size' must be 1..{MAX_SIZE}, not {size_text!r}.")
    size = int(size_text)
    cursor = request.query_params.get("cursor")
    before = store.decode_cursor(cursor) if cursor else 2**62
    rows = await store.list_anomalies(
        _pool(runtime),
        thing_id,
        feature_id,
        before=before,
        start=_time(request, "from"),
        end=_time(request, "to"),
        size=size + 1,
    )
    items = [
        {
            "revision": r["revision"],
            "timestamp": _iso(r["ts"]),
            "score": store.finite(r["score"]),
            "threshold": store.finite(r["threshold"]),
            "properties": r["contributions"],
            **(
                {"label": r["label"], "labelledBy": r["labelled_by"], "labelledAt": _iso(r["labelled_at"])}
                if r["label"] is not None
                else {}
            ),
        }
        for r in rows[:size]
    ]
    next_cursor = store.encode_cursor(items[-1]["revision"]) if len(rows) > size else None
    return json_response(200, {"items": items, "cursor": next_cursor})


async def label_anomaly(request: Request[Any, Any, Any]) -> Response[bytes]:
    runtime, auth, thing_id, feature_id = await _access(request, write=True)
    revision = int(request.path_params["revision"])
    label = await read_json(request, (JSON,))
    if label not in store.LABELS:
        raise InvalidInputError(
            f"The label must be one of {', '.join(repr(x) for x in store.LABELS)}, not {label!r}.",
            error="things:anomaly.label.invalid",
        )
    assert runtime.recorder is not None
    labelled = await store.label_anomaly(
        _pool(runtime), runtime.recorder, thing_id, feature_id, revision, label, auth.subject,
        correlation_id(request),
    )
    if not labelled:
        raise NotFoundError(
            f"The Feature '{feature_id}' of the Thing with ID '{thing_id}' has no anomaly "
            f"at revision {revision}.",
            error="things:anomaly.notfound",
            description="List the anomalies with GET .../anomaly/anomalies.",
        )
    return json_response(204)


def _rule_not_found(definition: str) -> NotFoundError:
    return NotFoundError(
        f"There is no anomaly detector for the feature definition '{definition}'.",
        error="things:anomaly.rule.notfound",
        description="Put one with PUT /api/2/anomaly/definitions/{definition}.",
    )


def _rule_body(row: Any, attached: int | None = None) -> dict[str, Any]:
    body = {
        "definition": row["definition"],
        "detector": _shown(row["config"]),
        "created": _iso(row["created"]),
        "modified": _iso(row["modified"]),
    }
    if attached is not None:
        body["attached"] = attached
    return body


async def _rule(request: Request[Any, Any, Any]) -> tuple[Runtime, AuthContext, str, Any]:
    """The runtime, caller, definition and the caller's rule of it (None: none yet)."""
    auth = await authenticate(request)
    runtime: Runtime = request.app.state.runtime
    definition = str(request.path_params["definition"])
    if not definition or len(definition) > 512:
        raise InvalidInputError("The feature definition must have 1 to 512 characters.")
    # Others' rules of the definition are neither shown nor changed (rules are per owner).
    row = await rules.get_rule(_pool(runtime), definition, auth.subject, tuple(auth.subjects))
    return runtime, auth, definition, row


async def put_rule(request: Request[Any, Any, Any]) -> Response[bytes]:
    runtime, auth, definition, row = await _rule(request)
    config = store.validate_config(await read_json(request, (JSON,)))
    assert runtime.service is not None
    owner = auth.subject if row is None else str(row["owner"])
    created, attached = await rules.put_rule(
        _pool(runtime), runtime.service.cache, definition, config, tuple(auth.subjects), owner
    )
    if runtime.anomaly is not None:
        runtime.anomaly.invalidate()
    headers = {"twinstore-attached": str(attached)}
    if not created:
        return json_response(204, headers=headers)
    row = await rules.get_rule(_pool(runtime), definition, owner, ())
    return json_response(201, _rule_body(row), headers=headers)


async def get_rule(request: Request[Any, Any, Any]) -> Response[bytes]:
    runtime, _, definition, row = await _rule(request)
    if row is None:
        raise _rule_not_found(definition)
    attached = await rules.attached(_pool(runtime), definition, str(row["owner"]))
    return json_response(200, _rule_body(row, attached))


async def delete_rule(request: Request[Any, Any, Any]) -> Response[bytes]:
    runtime, _, definition, row = await _rule(request)
    if row is None or not await rules.delete_rule(_pool(runtime), definition, str(row["owner"])):
        raise _rule_not_found(definition)
    if runtime.anomaly is not None:
        runtime.anomaly.invalidate()
    return json_response(204)


async def list_rules(request: Request[Any, Any, Any]) -> Response[bytes]:
    auth = await authenticate(request)
    runtime: Runtime = request.app.state.runtime
    mine = set(auth.subjects)
    rows = [r for r in await rules.list_rules(_pool(runtime)) if set(r["subjects"]) & mine]
    return json_response(200, {"items": [_rule_body(r) for r in rows]})


def anomaly_handlers() -> list[HTTPRouteHandler]:
    """The anomaly routes under a feature."""
    common: dict[str, Any] = {"tags": TAGS, "status_code": 200}
    return [
        put(F + "/detector", operation_id="putFeatureAnomalyDetector",
            summary="Attach (or replace) the feature's anomaly detector", **common)(put_detector),
        get(F + "/detector", operation_id="getFeatureAnomalyDetector",
            summary="Retrieve the feature's anomaly detector", **common)(get_detector),
        delete(F + "/detector", operation_id="deleteFeatureAnomalyDetector",
               summary="Detach the feature's anomaly detector", **common)(delete_detector),
        get(F, operation_id="getFeatureAnomaly",
            summary="Retrieve the feature's latest anomaly score", **common)(get_latest),
        get(F + "/anomalies", operation_id="getFeatureAnomalies",
            summary="List the feature's anomalies, newest first", **common)(list_anomalies),
        put(F + "/anomalies/{revision:int}/label", operation_id="putFeatureAnomalyLabel",
            summary="Label an anomaly: confirmed or false-alarm", **common)(label_anomaly),
        put(D + "/{definition:str}", operation_id="putDefinitionAnomalyDetector",
            summary="A detector for every feature with a definition (that the caller may write)",
            **common)(put_rule),
        get(D + "/{definition:str}", operation_id="getDefinitionAnomalyDetector",
            summary="Retrieve the detector rule of a feature definition", **common)(get_rule),
        delete(D + "/{definition:str}", operation_id="deleteDefinitionAnomalyDetector",
               summary="Remove the rule and the detectors it attached", **common)(delete_rule),
        get(D, operation_id="getDefinitionAnomalyDetectors",
            summary="List the caller's detector rules by feature definition", **common)(list_rules),
    ]  # fmt: skip
