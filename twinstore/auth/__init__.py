"""Authentication: who made a request, as one or more subjects (Ditto's auth context).

Methods, tried in this order by :class:`Authenticator`:

* ``x-ditto-pre-authenticated`` from a trusted reverse proxy (:mod:`.preauth`, off by default);
* ``Authorization: Bearer <jwt>`` from configured issuers (:mod:`.bearer`, keys in :mod:`.keys`);
* ``Authorization: Basic`` against an htpasswd file with bcrypt hashes (:mod:`.basic`).

Every failure is :class:`~twinstore.model.errors.AuthenticationError` (401
``gateway:authentication.failed``); an unreachable key provider is a 503
``gateway:authentication.provider.unavailable``.
"""

from twinstore.auth.authenticator import AuthContext, Authenticator
from twinstore.auth.basic import BasicAuth, default_dev_users, write_users_file
from twinstore.auth.bearer import JwtAuth, subjects_of
from twinstore.auth.preauth import PREAUTH_HEADER, PreAuth

__all__ = [
    "PREAUTH_HEADER",
    "AuthContext",
    "Authenticator",
    "BasicAuth",
    "JwtAuth",
    "PreAuth",
    "default_dev_users",
    "subjects_of",
    "write_users_file",
]
