"""``twinstore audit checkpoint``: sealed chain heads catch truncation; roots and signatures verify.

As in ``tests/test_audit.py``, things are written through the HTTP API, copied into a scratch
database and tampered with there.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tests.conftest import ROOT
from tests.test_audit import copy_namespace, make_things, sql
from twinstore.audit import Scope, checkpoint_database, merkle_root, verify_database
from twinstore.settings import Settings


@pytest.fixture
def namespace() -> str:
    return f"org.checkpoint{secrets.token_hex(4)}"


def write_key(path: Path) -> str:
    pem = Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.write_bytes(pem)
    return str(path)


def cli(url: str, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TWINSTORE_DATABASE_URL": url}
    env.pop("TWINSTORE_AUDIT_SIGNING_KEY", None)
    if key is not None:
        env["TWINSTORE_AUDIT_SIGNING_KEY"] = key
    return subprocess.run(
        [sys.executable, "-m", "twinstore.cli", "audit", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_merkle_root_is_order_independent_and_sensitive() -> None:
    heads = [("thing", f"a:{n}", n, bytes([n]) * 32) for n in range(1, 6)]
    assert merkle_root(heads) == merkle_root(list(reversed(heads)))
    assert merkle_root(heads) != merkle_root(heads[:4])
    changed = [*heads[:4], ("thing", "a:5", 6, heads[4][3])]
    assert merkle_root(heads) != merkle_root(changed)


async def test_truncation_is_caught(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    a, b = await make_things(client, namespace)
    await copy_namespace(settings, scratch_database, namespace)
    cp = await checkpoint_database(scratch_database)
    assert cp.heads == 4 and cp.key_id is None  # 2 things and their 2 policies
    report = await verify_database(scratch_database)
    assert report.ok and report.checkpoints == 1
    # Delete the newest 2 events of a: its chain is still valid, the checkpoint names it.
    await sql(scratch_database, f"DELETE FROM journal WHERE entity = 'thing' AND id = '{a}' AND revision > 4")
    report = await verify_database(scratch_database)
    assert [(x.entity, x.id, x.revision, x.kind) for x in report.breaks] == [("thing", a, 6, "truncated")]
    assert "newest revision is now 4" in report.breaks[0].detail and report.broken_entities == 1
    assert (await verify_database(scratch_database, checkpoints="none")).ok
    assert (await verify_database(scratch_database, Scope(thing=b))).ok
    # A newer checkpoint seals the truncated chain: latest is OK, all still names it.
    await checkpoint_database(scratch_database)
    assert (await verify_database(scratch_database)).ok
    report = await verify_database(scratch_database, checkpoints="all")
    assert [(x.id, x.kind) for x in report.breaks] == [(a, "truncated")] and report.checkpoints == 2


async def test_signed_checkpoint_and_tampering(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str, tmp_path: Path
) -> None:
    await make_things(client, namespace, count=3, edits=2)
    await copy_namespace(settings, scratch_database, namespace)
    key = write_key(tmp_path / "audit.pem")
    cp = await checkpoint_database(scratch_database, signing_key=key)
    assert cp.key_id is not None and cp.heads == 6
    assert (await verify_database(scratch_database, signing_key=key)).ok
    # Another key: reported.
    other = write_key(tmp_path / "other.pem")
    report = await verify_database(scratch_database, signing_key=other)
    assert [x.kind for x in report.breaks] == ["checkpoint-invalid"]
    # A tampered signature.
    await sql(
        scratch_database,
        f"UPDATE audit_checkpoints SET signature = set_byte(signature, 0, get_byte(signature, 0) # 1)"
        f" WHERE id = {cp.id}",
    )
    report = await verify_database(scratch_database, signing_key=key)
    assert [(x.entity, x.id, x.kind) for x in report.breaks] == [
        ("checkpoint", str(cp.id), "checkpoint-invalid")
    ]
    assert "signature" in report.breaks[0].detail
    # A tampered root: does not recompute (nor verify); without a key only the root is checked.
    cp2 = await checkpoint_database(scratch_database, signing_key=key)
    assert (await verify_database(scratch_database, signing_key=key)).ok
    await sql(scratch_database, f"UPDATE audit_checkpoints SET root = sha256('forged') WHERE id = {cp2.id}")
    report = await verify_database(scratch_database)
    assert [x.kind for x in report.breaks] == ["checkpoint-invalid"]
    assert "Merkle root" in report.breaks[0].detail
    report = await verify_database(scratch_database, signing_key=key)
    assert [x.kind for x in report.breaks] == ["checkpoint-invalid", "checkpoint-invalid"]


async def test_cli_checkpoint_and_verify(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str, tmp_path: Path
) -> None:
    (a,) = await make_things(client, namespace, count=1)
    await copy_namespace(settings, scratch_database, namespace)
    key = write_key(tmp_path / "audit.pem")
    done = cli(scratch_database, "checkpoint", key=key)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "checkpoint 1: 2 chain heads" in done.stdout and "signed by key" in done.stdout
    done = cli(scratch_database, "verify", key=key)
    assert done.returncode == 0 and "OK" in done.stdout, done.stdout + done.stderr
    await sql(scratch_database, f"DELETE FROM journal WHERE entity = 'thing' AND id = '{a}' AND revision = 6")
    done = cli(scratch_database, "verify", key=key)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"thing {a} revision 6: truncated" in done.stdout
