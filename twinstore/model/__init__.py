"""The pure domain model: ids, things, commands, events, patches, errors. No I/O."""

from twinstore.model.errors import DittoError
from twinstore.model.thing import (
    Command,
    Create,
    Delete,
    Event,
    JsonPatch,
    Merge,
    Modify,
    ThingState,
    decide,
    evolve,
    replay,
)

__all__ = [
    "Command",
    "Create",
    "Delete",
    "DittoError",
    "Event",
    "JsonPatch",
    "Merge",
    "Modify",
    "ThingState",
    "decide",
    "evolve",
    "replay",
]
