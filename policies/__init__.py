"""Ditto's policy model and decision point (pure Python, no I/O).

:mod:`policies.model` parses and validates policies; :mod:`policies.enforcer` evaluates them.
"""

from policies.enforcer import MISSING, Enforcer, SubjectView
from policies.model import (
    EXECUTE,
    PERMISSIONS,
    READ,
    RESOURCE_TYPES,
    WRITE,
    Entry,
    Policy,
    PolicyInvalidError,
    ResourcePermissions,
    Subject,
    parse_entry,
    parse_policy,
    parse_resource_key,
)

__all__ = [
    "EXECUTE",
    "MISSING",
    "PERMISSIONS",
    "READ",
    "RESOURCE_TYPES",
    "WRITE",
    "Enforcer",
    "Entry",
    "Policy",
    "PolicyInvalidError",
    "ResourcePermissions",
    "Subject",
    "SubjectView",
    "parse_entry",
    "parse_policy",
    "parse_resource_key",
]
