"""``twinstore audit checkpoint``: sealed chain heads catch truncation; roots and signatures verify;
a checkpoint records the partition heads it sealed (its cut of the journal) under its signature,
and checkpoints from before partitions (v1) still verify.

As in ``tests/test_audit.py``, things are written through the HTTP API, copied into a scratch
database and tampered with there.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from pathlib import Path

import asyncpg
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tests.conftest import twinstore_on
from tests.test_audit import copy_namespace, make_things, sql
from twinstore.audit import (
    Scope,
    canonical_vector,
    checkpoint_database,
    checkpoint_message,
    load_signing_key,
    merkle_root,
    parse_vector,
    verify_database,
)
from twinstore.settings import Settings


@pytest.fixture
def namespace() -> str:
    return f"org.checkpoint{secrets.token_hex(4)}"


def write_key(path: Path) -> str:
    pem = Ed25519PrivateKey.generate().private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.write_bytes(pem)
    return str(path)


def cli(url: str, *args: str, key: str | None = None) -> subprocess.CompletedProcess[str]:
    return twinstore_on(url, "audit", *args, timeout=60, TWINSTORE_AUDIT_SIGNING_KEY=key)


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


def test_canonical_vector_is_one_text_per_vector() -> None:
    assert canonical_vector({}) == b"{}"
    vector = {p: p * 3 for p in range(12)}
    text = canonical_vector(vector)
    assert canonical_vector(dict(reversed(vector.items()))) == text
    assert parse_vector(text.decode()) == vector
    # as jsonb prints it (shorter keys first, spaces): the same vector, the same canonical text
    assert canonical_vector(parse_vector('{"2": 6, "10": 30, "0": 0}')) == b'{"0":0,"2":6,"10":30}'
    for bad in ("[]", '{"a": 1}', '{"1": -1}', '{"1": 1.5}', '{"1": true}', '{"-1": 2}'):
        with pytest.raises(ValueError):
            parse_vector(bad)


async def fetch_one(url: str, query: str) -> asyncpg.Record:
    con = await asyncpg.connect(url)
    try:
        row = await con.fetchrow(query)
        assert row is not None
        return row
    finally:
        await con.close()


async def test_checkpoint_records_the_partition_heads_it_sealed(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str, tmp_path: Path
) -> None:
    await make_things(client, namespace, count=3, edits=2)
    await copy_namespace(settings, scratch_database, namespace)
    key = write_key(tmp_path / "audit.pem")
    cp = await checkpoint_database(scratch_database, signing_key=key)
    heads = await fetch_one(
        scratch_database, "SELECT json_object_agg(partition, seq)::text AS v FROM partition_heads"
    )
    assert cp.partition_heads == parse_vector(heads["v"]) and len(cp.partition_heads) == 64
    assert cp.events == 3 * 3 + 3  # every event of the 3 things and their 3 policies
    stored = await fetch_one(
        scratch_database,
        f"SELECT partition_heads::text AS v, journal_position FROM audit_checkpoints WHERE id = {cp.id}",
    )
    assert parse_vector(stored["v"]) == cp.partition_heads
    assert stored["journal_position"] == cp.journal_position > 0  # still filled, for old readers
    assert cp.as_dict()["partition_heads"] == {str(p): s for p, s in cp.partition_heads.items()}
    assert (await verify_database(scratch_database, signing_key=key)).ok

    async def kinds() -> list[tuple[str, str]]:
        report = await verify_database(scratch_database, signing_key=key)
        return [(x.kind, x.detail) for x in report.breaks]

    # The signature covers the partition heads: raised, or dropped (the v1 message is another one).
    partition = next(p for p, seq in cp.partition_heads.items() if seq)
    await sql(
        scratch_database,
        f"UPDATE audit_checkpoints SET partition_heads = jsonb_set(partition_heads, '{{{partition}}}', "
        f"to_jsonb({cp.partition_heads[partition] + 5})) WHERE id = {cp.id}",
    )
    assert await kinds() == [("checkpoint-invalid", "the signature does not verify")]
    assert (await verify_database(scratch_database)).ok  # without the key: the root still holds
    await sql(scratch_database, f"UPDATE audit_checkpoints SET partition_heads = NULL WHERE id = {cp.id}")
    assert await kinds() == [("checkpoint-invalid", "the signature does not verify")]
    # Not a vector at all: reported with or without a key.
    await sql(scratch_database, f"UPDATE audit_checkpoints SET partition_heads = '[1]' WHERE id = {cp.id}")
    report = await verify_database(scratch_database)
    assert [x.kind for x in report.breaks] == ["checkpoint-invalid"]
    assert "partition heads" in report.breaks[0].detail
    await sql(
        scratch_database,
        f"UPDATE audit_checkpoints SET partition_heads = '{canonical_vector(cp.partition_heads).decode()}' "
        f"WHERE id = {cp.id}",
    )
    assert await kinds() == []


async def test_checkpoint_from_before_partitions_still_verifies(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str, tmp_path: Path
) -> None:
    """A v1 checkpoint (no partition heads, signed over its journal position) as the code before
    partitions made it: checked against the journal and its signature as before."""
    (a,) = await make_things(client, namespace, count=1)
    await copy_namespace(settings, scratch_database, namespace)
    key = write_key(tmp_path / "audit.pem")
    cp = await checkpoint_database(scratch_database, signing_key=key)
    private = load_signing_key(key)
    v1 = private.sign(checkpoint_message(cp.root, None, cp.journal_position))
    assert v1 != private.sign(checkpoint_message(cp.root, cp.partition_heads))
    await sql(
        scratch_database,
        f"UPDATE audit_checkpoints SET partition_heads = NULL, signature = decode('{v1.hex()}', 'hex') "
        f"WHERE id = {cp.id}",
    )
    assert (await verify_database(scratch_database, signing_key=key)).ok
    # v1 signed the journal position: changing it is caught.
    await sql(scratch_database, "UPDATE audit_checkpoints SET journal_position = journal_position + 1")
    report = await verify_database(scratch_database, signing_key=key)
    assert [(x.kind, x.detail) for x in report.breaks] == [
        ("checkpoint-invalid", "the signature does not verify")
    ]
    await sql(scratch_database, "UPDATE audit_checkpoints SET journal_position = journal_position - 1")
    # and its heads are checked against the journal as any checkpoint's.
    await sql(scratch_database, f"DELETE FROM journal WHERE entity = 'thing' AND id = '{a}' AND revision = 6")
    report = await verify_database(scratch_database, signing_key=key)
    assert [(x.id, x.revision, x.kind) for x in report.breaks] == [(a, 6, "truncated")]


async def test_cli_checkpoint_json(
    client: httpx.AsyncClient, settings: Settings, scratch_database: str, namespace: str
) -> None:
    await make_things(client, namespace, count=2, edits=1)
    await copy_namespace(settings, scratch_database, namespace)
    done = cli(scratch_database, "checkpoint", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(done.stdout)
    assert data["heads"] == 4 and data["key_id"] is None and len(data["partition_heads"]) == 64
    assert sum(data["partition_heads"].values()) == 2 * 2 + 2
    done = cli(scratch_database, "checkpoint")
    assert done.returncode == 0, done.stdout + done.stderr
    filled = sum(1 for seq in data["partition_heads"].values() if seq)
    assert (
        f"checkpoint {data['id'] + 1}: 4 chain heads, sealing the 6 events up to the heads of 64 "
        f"partitions ({filled} with events" in done.stdout
    ), done.stdout
    assert "unsigned" in done.stdout
