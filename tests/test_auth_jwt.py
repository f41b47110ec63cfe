"""JWT bearer tokens, pre-authenticated subjects and basic side by side (real keys, real HTTP)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from tests.test_auth import basic
from twinstore.auth import Authenticator
from twinstore.auth.bearer import IssuerVerifier
from twinstore.model.errors import AuthenticationError, UnavailableError
from twinstore.settings import Settings, load_settings

RSA_ISS = "https://rsa.example/realms/plant"
HMAC_ISS = "https://hmac.example"
URL_ISS = "https://url.example"
SECRET = "a-shared-secret-of-at-least-32-bytes!"
AUDIENCE = "twinstore"


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="session")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="session")
def other_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}


@pytest.fixture(scope="session")
def jwks_file(
    tmp_path_factory: pytest.TempPathFactory, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> Path:
    path = tmp_path_factory.mktemp("jwks") / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk(rsa_key, "r1"), ec_jwk(ec_key, "e1")]}))
    return path


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 in a thread; ``document`` may be swapped (key rotation)."""

    def __init__(self) -> None:
        self.document: dict[str, Any] = {"keys": []}
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                data = json.dumps(outer.document).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/certs"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def jwks_server() -> Iterator[JwksServer]:
    server = JwksServer()
    yield server
    server.close()


def issuers(jwks_file: Path, jwks_url: str | None = None) -> list[dict[str, Any]]:
    configured: list[dict[str, Any]] = [
        {
            "issuer": RSA_ISS,
            "prefix": "idp",
            "subjects": ["{{ jwt:sub }}", "{{ jwt:groups }}"],
            "audience": AUDIENCE,
            "jwks_file": str(jwks_file),
        },
        {"issuer": HMAC_ISS, "prefix": "shared", "secret": SECRET, "subjects": ["{{ jwt:email }}"]},
    ]
    if jwks_url:
        configured.append({"issuer": URL_ISS, "prefix": "web", "jwks_url": jwks_url})
    return configured


@pytest.fixture
def auth(jwks_file: Path, users_file: Path) -> Authenticator:
    settings = load_settings({}, users_file=str(users_file), jwt_issuers=issuers(jwks_file))
    return Authenticator.from_settings(settings)


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": RSA_ISS, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300, **extra}


def rs256(key: rsa.RSAPrivateKey, body: dict[str, Any], kid: str | None = "r1", alg: str = "RS256") -> str:
    return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], body: dict[str, Any], secret: bytes | None = None) -> str:
    """A token built without PyJWT (which refuses to make the attacks)."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(body).encode())}"
    signature = b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()) if secret else ""
    return f"{signing_input}.{signature}"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# ---- valid tokens ------------------------------------------------------------------------


async def test_rs256_token_gives_sub_and_groups(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    token = rs256(rsa_key, claims(groups=["operators", "plant-1"]))
    context = await auth.authenticate(bearer(token))
    assert context.subjects == ("idp:alice", "idp:operators", "idp:plant-1")
    assert context.subject == "idp:alice"


async def test_es256_token(auth: Authenticator, ec_key: ec.EllipticCurvePrivateKey) -> None:
    token = jwt.encode(
        claims(sub="bob", aud=["other", AUDIENCE]), ec_key, algorithm="ES256", headers={"kid": "e1"}
    )
    assert (await auth.authenticate(bearer(token))).subjects == ("idp:bob",)


async def test_hs256_token_with_secret(auth: Authenticator) -> None:
    token = jwt.encode(claims(iss=HMAC_ISS, email="carol@example.com"), SECRET, algorithm="HS256")
    assert (await auth.authenticate(bearer(token))).subjects == ("shared:carol@example.com",)


async def test_missing_template_claims_give_no_subject_but_others_do(
    auth: Authenticator, rsa_key: rsa.RSAPrivateKey
) -> None:
    token = rs256(rsa_key, claims())  # no groups claim: only the sub template yields
    assert (await auth.authenticate(bearer(token))).subjects == ("idp:alice",)


async def test_leeway_accepts_a_just_expired_token(auth: Authenticator, rsa_key: rsa.RSAPrivateKey) -> None:
    now = int(time.time())
    token = rs256(rsa_key, claims(exp=now - 10, nbf=now + 10))
    assert (await auth.authenticate(bearer(token))).subjects == ("idp:alice",)


async def test_verified_token_is_cached(
    auth: Authenticator, rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []
    real = IssuerVerifier.verify

    async def counting(self: IssuerVerifier, token: str, header: dict[str, Any]) -> dict[str, Any]:
        calls.append(token)
        return await real(self, token, header)

    monkeypatch.setattr(IssuerVerifier, "verify", counting)
    token = rs256(rsa_key, claims())
    for _ in range(5):
        assert (await auth.authenticate(bearer(token))).subject == "idp:alice"
    assert len(calls) == 1
    with pytest.raises(AuthenticationError):  # a tampered copy is not served from the cache
        await auth.authenticate(bearer(token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")))


# ---- attacks and invalid tokens ----------------------------------------------------------


def attacks(
    rsa_key: rsa.RSAPrivateKey, other: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> dict[str, tuple[str, str]]:
    """name -> (token, part of the expected message)."""
    now = int(time.time())
    public_pem = rsa_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    valid = rs256(rsa_key, claims())
    head, _, signature = valid.split(".")
    forged_payload = b64(json.dumps(claims(sub="admin")).encode())
    return {
        "alg none": (hand_made({"alg": "none", "typ": "JWT"}, claims()), "alg 'none'"),
        "alg None": (hand_made({"alg": "None", "kid": "r1"}, claims()), "alg 'none'"),
        "hs256 with rsa public key as secret": (
            hand_made({"alg": "HS256", "kid": "r1"}, claims(), secret=public_pem),
            "algorithm 'HS256' is not allowed for issuer",
        ),
        "algorithm not configured": (
            rs256(rsa_key, claims(), alg="RS384"),
            "algorithm 'RS384' is not allowed",
        ),
        "wrong key": (rs256(other, claims()), "signature is not valid"),
        "tampered payload": (f"{head}.{forged_payload}.{signature}", "signature is not valid"),
        "unknown kid": (rs256(rsa_key, claims(), kid="nope"), "key id 'nope' is not a known key"),
        "no kid among several keys": (rs256(rsa_key, claims(), kid=None), "no 'kid' header"),
        "es256 token naming the rsa key": (
            jwt.encode(claims(), ec_key, algorithm="ES256", headers={"kid": "r1"}),
            "cannot verify algorithm 'ES256'",
        ),
        "expired": (rs256(rsa_key, claims(exp=now - 120)), "expired at"),
        "not yet valid": (rs256(rsa_key, claims(nbf=now + 300)), "not valid before"),
        "issued in the future": (rs256(rsa_key, claims(iat=now + 300)), "not valid before"),
        "wrong audience": (rs256(rsa_key, claims(aud="someone-else")), "does not contain 'twinstore'"),
        "no audience": (rs256(rsa_key, {k: v for k, v in claims().items() if k != "aud"}), "no 'aud' claim"),
        "no exp": (rs256(rsa_key, {k: v for k, v in claims().items() if k != "exp"}), "no 'exp' claim"),
        "unknown issuer": (rs256(rsa_key, claims(iss="https://evil.example")), "not a trusted issuer"),
        "no issuer": (rs256(rsa_key, {k: v for k, v in claims().items() if k != "iss"}), "no 'iss' claim"),
        "no subject": (rs256(rsa_key, {k: v for k, v in claims().items() if k != "sub"}), "gives no subject"),
        "hs256 wrong secret": (
            jwt.encode(
                claims(iss=HMAC_ISS, email="x@y"), "another-secret-of-32-bytes-or-more!!", algorithm="HS256"
            ),
            "signature is not valid",
        ),
        "rs256 at the hmac issuer": (
            rs256(rsa_key, claims(iss=HMAC_ISS)),
            "algorithm 'RS256' is not allowed",
        ),
        "garbage": ("not-a-jwt", "not a well-formed JWT"),
        "three garbage parts": ("a.b.c", "not a well-formed JWT"),
        "payload not json": (f"{head}.{b64(b'[1,2')}.{signature}", "not a well-formed JWT"),
        "empty": ("", "has no token"),
        "huge": ("a" * 20_000, "longer than"),
    }


ATTACKS = [
    "alg none",
    "alg None",
    "hs256 with rsa public key as secret",
    "algorithm not configured",
    "wrong key",
    "tampered payload",
    "unknown kid",
    "no kid among several keys",
    "es256 token naming the rsa key",
    "expired",
    "not yet valid",
    "issued in the future",
    "wrong audience",
    "no audience",
    "no exp",
    "unknown issuer",
    "no issuer",
    "no subject",
    "hs256 wrong secret",
    "rs256 at the hmac issuer",
    "garbage",
    "three garbage parts",
    "payload not json",
    "empty",
    "huge",
]


@pytest.mark.parametrize("name", ATTACKS)
async def test_bad_tokens_are_401_naming_the_check(
    auth: Authenticator,
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
    ec_key: ec.EllipticCurvePrivateKey,
    name: str,
) -> None:
    token, expected = attacks(rsa_key, other_rsa_key, ec_key)[name]
    with pytest.raises(AuthenticationError) as info:
        await auth.authenticate(bearer(token))
    assert expected in info.value.message, info.value.message
    assert info.value.status == 401


def test_every_attack_is_tested(
    rsa_key: rsa.RSAPrivateKey, other_rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey
) -> None:
    assert sorted(attacks(rsa_key, other_rsa_key, ec_key)) == sorted(ATTACKS)


# ---- keys from a URL ---------------------------------------------------------------------


async def test_jwks_url_is_cached_and_refetched_for_a_new_kid(
    jwks_file: Path,
    jwks_server: JwksServer,
    rsa_key: rsa.RSAPrivateKey,
    other_rsa_key: rsa.RSAPrivateKey,
) -> None:
    jwks_server.document = {"keys": [rsa_jwk(rsa_key, "k1")]}
    auth = Authenticator.from_settings(load_settings({}, jwt_issuers=issuers(jwks_file, jwks_server.url)))
    assert auth.bearer is not None
    for sub in ("a", "b", "c"):
        token = rs256(rsa_key, claims(iss=URL_ISS, sub=sub), kid="k1")
        assert (await auth.authenticate(bearer(token))).subjects == (f"web:{sub}",)
    assert jwks_server.fetches == 1

    # rotation: the provider now signs with k2; a token naming k2 makes us refetch once
    jwks_server.document = {"keys": [rsa_jwk(rsa_key, "k1"), rsa_jwk(other_rsa_key, "k2")]}
    auth.bearer.issuers[URL_ISS].keys.min_refresh = 0  # type: ignore[attr-defined]
    token = rs256(other_rsa_key, claims(iss=URL_ISS, sub="rotated"), kid="k2")
    assert (await auth.authenticate(bearer(token))).subjects == ("web:rotated",)
    assert jwks_server.fetches == 2

    with pytest.raises(AuthenticationError, match="key id 'k3' is not a known key"):
        await auth.authenticate(bearer(rs256(other_rsa_key, claims(iss=URL_ISS), kid="k3")))


async def test_unknown_kids_do_not_hammer_the_provider(
    jwks_file: Path, jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey
) -> None:
    jwks_server.document = {"keys": [rsa_jwk(rsa_key, "k1")]}
    auth = Authenticator.from_settings(load_settings({}, jwt_issuers=issuers(jwks_file, jwks_server.url)))
    for i in range(10):
        with pytest.raises(AuthenticationError, match="not a known key"):
            await auth.authenticate(bearer(rs256(rsa_key, claims(iss=URL_ISS), kid=f"random-{i}")))
    assert jwks_server.fetches == 1  # refetches on unknown kids are rate limited


async def test_unreachable_jwks_url_is_503(jwks_file: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    server = JwksServer()
    url = server.url
    server.close()  # nothing listens there any more
    auth = Authenticator.from_settings(load_settings({}, jwt_issuers=issuers(jwks_file, url)))
    with pytest.raises(UnavailableError) as info:
        await auth.authenticate(bearer(rs256(rsa_key, claims(iss=URL_ISS), kid="k1")))
    assert info.value.status == 503
    assert info.value.to_dict()["error"] == "gateway:authentication.provider.unavailable"


# ---- pre-authenticated subjects ----------------------------------------------------------

PRE = "x-ditto-pre-authenticated"


def preauth_settings(users_file: Path, **extra: Any) -> Settings:
    return load_settings({}, users_file=str(users_file), **extra)


async def test_preauth_from_trusted_proxy(users_file: Path) -> None:
    auth = Authenticator.from_settings(preauth_settings(users_file, preauth_enabled=True))
    context = await auth.authenticate({PRE: "nginx:alice, idp:ops"}, "127.0.0.1")
    assert context.subjects == ("nginx:alice", "idp:ops")
    assert (await auth.authenticate({PRE: "nginx:alice"}, "::1")).subjects == ("nginx:alice",)
    assert (await auth.authenticate({PRE: "nginx:alice"}, "::ffff:127.0.0.1")).subject == "nginx:alice"


async def test_preauth_trusted_networks_are_configurable(users_file: Path) -> None:
    auth = Authenticator.from_settings(
        preauth_settings(users_file, preauth_enabled=True, preauth_trusted=["10.0.0.0/8"])
    )
    assert (await auth.authenticate({PRE: "proxy:bob"}, "10.1.2.3")).subject == "proxy:bob"
    with pytest.raises(AuthenticationError, match="missing the 'Authorization' header"):
        await auth.authenticate({PRE: "proxy:bob"}, "127.0.0.1")


@pytest.mark.parametrize(
    ("enabled", "client"), [(True, "192.0.2.7"), (True, None), (True, "testclient"), (False, "127.0.0.1")]
)
async def test_preauth_header_is_ignored_unless_enabled_and_trusted(
    users_file: Path, enabled: bool, client: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    auth = Authenticator.from_settings(preauth_settings(users_file, preauth_enabled=enabled))
    headers = {PRE: "nginx:admin", "authorization": basic("ditto", "ditto")}
    assert (await auth.authenticate(headers, client)).subjects == ("nginx:ditto",)
    assert "ignored pre-authenticated header" in caplog.text
    with pytest.raises(AuthenticationError):
        await auth.authenticate({PRE: "nginx:admin"}, client)


@pytest.mark.parametrize("header", ["alice", "nginx:", ":alice", "nginx:alice,", "nginx:a,,nginx:b", ""])
async def test_preauth_invalid_subjects_are_401(users_file: Path, header: str) -> None:
    auth = Authenticator.from_settings(preauth_settings(users_file, preauth_enabled=True))
    with pytest.raises(AuthenticationError, match="invalid subject"):
        await auth.authenticate({PRE: header}, "127.0.0.1")


# ---- basic beside JWT --------------------------------------------------------------------


async def test_basic_still_works_beside_jwt(auth: Authenticator) -> None:
    assert (await auth.authenticate({"authorization": basic("ditto", "ditto")})).subjects == ("nginx:ditto",)
    with pytest.raises(AuthenticationError, match="username or password"):
        await auth.authenticate({"authorization": basic("ditto", "wrong")})


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "The request is missing the 'Authorization' header."),
        ({"authorization": ""}, "The request is missing the 'Authorization' header."),
        ({"authorization": "Digest abc"}, "scheme 'Digest' is not supported"),
        ({"authorization": "Bearer"}, "has no token"),
    ],
)
async def test_missing_or_unsupported_credentials(
    auth: Authenticator, headers: dict[str, str], message: str
) -> None:
    with pytest.raises(AuthenticationError) as info:
        await auth.authenticate(headers)
    assert message in info.value.message


async def test_jwt_only_server_refuses_basic(jwks_file: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator.from_settings(load_settings({}, jwt_issuers=issuers(jwks_file)))
    with pytest.raises(AuthenticationError, match="Basic authentication is not enabled"):
        await auth.authenticate({"authorization": basic("ditto", "ditto")})
    assert (await auth.authenticate(bearer(rs256(rsa_key, claims())))).subject == "idp:alice"


async def test_nothing_configured_refuses_everything(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = Authenticator.from_settings(load_settings({}))
    for headers in ({}, {"authorization": basic("ditto", "ditto")}, bearer(rs256(rsa_key, claims()))):
        with pytest.raises(AuthenticationError):
            await auth.authenticate(headers)


# ---- settings ----------------------------------------------------------------------------


def test_settings_from_environment_json(jwks_file: Path) -> None:
    s = load_settings(
        {
            "TWINSTORE_JWT_ISSUERS": json.dumps(issuers(jwks_file)),
            "TWINSTORE_PREAUTH_ENABLED": "true",
            "TWINSTORE_PREAUTH_TRUSTED": '["10.0.0.0/8", "fd00::/8"]',
        }
    )
    assert [i.issuer for i in s.jwt_issuers] == [RSA_ISS, HMAC_ISS]
    assert s.jwt_issuers[0].allowed_algorithms == ("RS256", "ES256")
    assert s.jwt_issuers[1].allowed_algorithms == ("HS256",)
    assert s.jwt_issuers[0].leeway == 30.0
    assert s.preauth_enabled and s.preauth_trusted == ["10.0.0.0/8", "fd00::/8"]
    assert SECRET not in repr(s) and "secret='***'" in repr(s)  # settings may be logged
    defaults = load_settings({})
    assert defaults.jwt_issuers == [] and not defaults.preauth_enabled
    assert defaults.preauth_trusted == ["127.0.0.1/32", "::1/128"]


@pytest.mark.parametrize("table", ["jwt_issuers", "twinstore.jwt_issuers"])
def test_settings_from_toml(tmp_path: Path, jwks_file: Path, table: str) -> None:
    config = tmp_path / "twinstore.toml"
    header = "[twinstore]\nport = 9000\n" if table.startswith("twinstore.") else "port = 9000\n"
    config.write_text(
        header + f"[[{table}]]\n"
        f'issuer = "{RSA_ISS}"\nprefix = "idp"\nsubjects = ["{{{{ jwt:sub }}}}", "{{{{ jwt:groups }}}}"]\n'
        f'audience = "twinstore"\njwks_file = "{jwks_file}"\nleeway = 5\n'
        f"[[{table}]]\n"
        f'issuer = "{HMAC_ISS}"\nprefix = "shared"\nsecret = "{SECRET}"\nalgorithms = ["HS256", "HS512"]\n'
    )
    s = load_settings({}, config_file=config)
    assert s.port == 9000
    assert s.jwt_issuers[0].subjects == ["{{ jwt:sub }}", "{{ jwt:groups }}"]
    assert s.jwt_issuers[0].leeway == 5.0
    assert s.jwt_issuers[1].allowed_algorithms == ("HS256", "HS512")


def one_issuer(**fields: Any) -> dict[str, str]:
    return {"TWINSTORE_JWT_ISSUERS": json.dumps([{"issuer": "i", "prefix": "p", **fields}])}


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"TWINSTORE_JWT_ISSUERS": "[{"}, "TWINSTORE_JWT_ISSUERS must be JSON"),
        ({"TWINSTORE_PREAUTH_TRUSTED": "10.0.0.0/8"}, "TWINSTORE_PREAUTH_TRUSTED must be JSON"),
        ({"TWINSTORE_PREAUTH_TRUSTED": '["not-a-network"]'}, "is not an IP network"),
        (one_issuer(), "exactly one of"),
        (one_issuer(secret="s", jwks_url="http://x"), "exactly one of"),
        (one_issuer(jwks_file="f", algorithms=["HS256"]), "HS* needs 'secret'"),
        (one_issuer(secret="s", algorithms=["RS256"]), "with 'secret' only"),
        (one_issuer(jwks_file="f", algorithms=["none"]), "with a key set only"),
        (one_issuer(jwks_file="f", algorithms=[]), "must not be empty"),
        (one_issuer(secret="s", prefix="a:b"), "'prefix'"),
        (one_issuer(secret="s", subjects=[]), "at least one template"),
        (one_issuer(secret="s", x=1), "unknown field"),
        (
            {
                "TWINSTORE_JWT_ISSUERS": json.dumps(
                    [
                        {"issuer": "i", "prefix": "p", "secret": "s"},
                        {"issuer": "i", "prefix": "q", "secret": "t"},
                    ]
                )
            },
            "only once",
        ),
    ],
)
def test_invalid_settings_exit_with_a_message(environ: dict[str, str], message: str) -> None:
    with pytest.raises(SystemExit) as info:
        load_settings(environ)
    assert message in str(info.value)
