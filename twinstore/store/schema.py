"""Database schema and migrations; safe when several processes migrate at once.

Every table a write transaction writes holds the journal partition of its rows, in its primary
key (after the entity id, which keys lead with: lookups by id use them), so journal, projection
and their companions can be distributed by partition (Citus, README "Running on Citus") with
every single-partition write on one shard; no query in the write path joins across things.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from twinstore.model.partition import DEFAULT_PARTITIONS, MAX_PARTITIONS, partition_key, partition_of
from twinstore.store import Connection
from twinstore.store.rql_sql import index_statements, statistics_statements

__all__ = ["MIGRATIONS", "PartitionsMismatchError", "ensure_search_indexes", "migrate", "stored_partitions"]

log = logging.getLogger("twinstore.store")

# A constant advisory-lock key: serialises concurrent `migrate` runs (server starts, the CLI).
MIGRATION_LOCK = 7_242_001

# A migration is SQL, or a function of the connection and the partition count for a new
# database (data moved in Python, e.g. partitions computed by crc32, which SQL lacks).
Migration = str | Callable[[Connection, int], Awaitable[None]]


# The journal's indexes, with the constraint each one backs (the primary key).
JOURNAL_INDEXES = """
SELECT c.relname AS name, pg_get_indexdef(i.indexrelid) AS definition, k.conname AS constraint,
       pg_get_constraintdef(k.oid) AS constraint_definition
FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
LEFT JOIN pg_constraint k ON k.conindid = i.indexrelid AND k.conrelid = i.indrelid
WHERE i.indrelid = 'journal'::regclass
ORDER BY c.relname
"""


async def _partition_journal(con: Connection, partitions: int) -> None:
    """15: the journal split into partitions, each with its own commit-ordered ``seq``
    (twinstore.store.recorder); existing events keep their order within each partition, and the
    relay's global cursor becomes one cursor per partition at the same place.

    Before partitions ``position`` was handed out under one write lock, so it is the commit
    order: numbering each partition's events by it gives the order a per-partition lock would
    have. Every row is rewritten once (one UPDATE sets both columns, the indexes are built
    again after it): on a large journal this is the long part of the upgrade.
    """
    await con.execute(
        """
        CREATE TABLE twinstore_meta (key text PRIMARY KEY, value jsonb NOT NULL);
        CREATE TABLE partition_heads (partition integer PRIMARY KEY, seq bigint NOT NULL DEFAULT 0)
            WITH (fillfactor = 50);  -- updated by every append: room for HOT updates
        ALTER TABLE journal ADD COLUMN partition integer, ADD COLUMN seq bigint;
        CREATE TABLE relay_cursors (
            name       text    NOT NULL,
            partition  integer NOT NULL,
            seq        bigint  NOT NULL,
            PRIMARY KEY (name, partition)
        );
        ALTER TABLE audit_checkpoints ADD COLUMN partition_heads jsonb;
        ALTER TABLE journal_cleanups ADD COLUMN partition_bounds jsonb;
        DROP FUNCTION twinstore_lock_and_heads(text[]);
        """
    )
    await con.execute(
        "INSERT INTO twinstore_meta (key, value) VALUES ('partitions', $1::text::jsonb)", str(partitions)
    )
    ids = await con.fetch("SELECT DISTINCT entity, id FROM journal")
    if ids:
        # crc32 (partition_of) has no SQL counterpart: each id's partition is computed here.
        await con.execute(
            "CREATE TEMPORARY TABLE journal_partitions (entity text, id text, partition integer) "
            "ON COMMIT DROP"
        )
        await con.copy_records_to_table(
            "journal_partitions",
            records=[(r["entity"], r["id"], partition_of(partition_key(r["id"]), partitions)) for r in ids],
        )
        # Every row gets a new version: updating the journal's indexes row by row took 3x as
        # long as dropping them and building them again after (1M events: 62 s against 22 s).
        indexes = await con.fetch(JOURNAL_INDEXES)
        for index in indexes:
            if index["constraint"] is not None:
                await con.execute(f'ALTER TABLE journal DROP CONSTRAINT "{index["constraint"]}"')
            else:
                await con.execute(f'DROP INDEX "{index["name"]}"')
        await con.execute(
            """
            ANALYZE journal_partitions;  -- temporary tables are never analyzed on their own
            UPDATE journal j SET partition = n.partition, seq = n.seq
            FROM (SELECT j.position, p.partition,
                         row_number() OVER (PARTITION BY p.partition ORDER BY j.position) AS seq
                  FROM journal j JOIN journal_partitions p ON p.entity = j.entity AND p.id = j.id) n
            WHERE j.position = n.position;
            """
        )
        for index in indexes:
            if index["constraint"] is not None:
                constraint, definition = index["constraint"], index["constraint_definition"]
                await con.execute(f'ALTER TABLE journal ADD CONSTRAINT "{constraint}" {definition}')
            else:
                await con.execute(index["definition"])
    # One scan of the journal each, not a lookup per partition: the (partition, seq) index, built
    # in the transaction that updated the rows, may not be usable before it commits.
    await con.execute(
        """
        INSERT INTO partition_heads (partition, seq)
        SELECT g, coalesce(m.seq, 0) FROM generate_series(0, $1 - 1) AS g
        LEFT JOIN (SELECT partition, max(seq) AS seq FROM journal GROUP BY partition) m ON m.partition = g
        """,
        partitions,
    )
    # The relay had published every position up to its cursor: per partition, every seq of those.
    await con.execute(
        """
        INSERT INTO relay_cursors (name, partition, seq)
        SELECT c.name, h.partition, coalesce(m.seq, 0)
        FROM relay_cursor c CROSS JOIN partition_heads h
        LEFT JOIN (SELECT r.name, j.partition, max(j.seq) AS seq
                   FROM relay_cursor r JOIN journal j ON j.position <= r.position
                   GROUP BY r.name, j.partition) m ON m.name = c.name AND m.partition = h.partition;
        DROP TABLE relay_cursor;
        ALTER TABLE journal ALTER COLUMN partition SET NOT NULL, ALTER COLUMN seq SET NOT NULL;
        CREATE UNIQUE INDEX journal_partition_seq ON journal (partition, seq);
        """
    )


# The tables written with journal events (or by the writer of one partition) that lacked a
# partition: table -> (the column holding the id partitioned by, its key columns). Their key
# becomes the old key plus ``partition`` (it still leads with the id: lookups by id use it).
PARTITIONED = {
    "things": ("id", ("id",)),
    "snapshots": ("id", ("entity", "id", "revision")),
    "policies": ("id", ("id",)),
    "anomaly_detectors": ("thing_id", ("thing_id", "feature_id")),
    "anomaly_state": ("thing_id", ("thing_id", "feature_id")),
    "anomalies": ("thing_id", ("thing_id", "feature_id", "revision")),
}
# Tables that had a partition but whose key lacked it.
REKEYED = {
    "journal": ("entity", "id", "revision"),
    "ingest_progress": ("consumer", "source"),
}


def consumer_partition(consumer: str, partitions: int) -> int:
    """The partition of an ingest consumer's progress row: the number its name ends with
    (``<stream>/<partition>``, twinstore.ingest), else its name's own partition (a name of
    another form: a stable place, no writer of the ingest path uses it).

    >>> consumer_partition("twinstore-ingest/3", 64), consumer_partition("ingest-3", 64)
    (3, 25)
    """
    _, _, tail = consumer.rpartition("/")
    if tail.isdigit() and int(tail) < partitions:
        return int(tail)
    return partition_of(consumer, partitions)


async def _swap_key(con: Connection, table: str, columns: tuple[str, ...]) -> None:
    """Make ``columns`` + ``partition`` the primary key of ``table`` (same constraint name; the
    index is built once, before the old one is dropped)."""
    constraint = await con.fetchval(
        "SELECT conname FROM pg_constraint WHERE conrelid = $1::regclass AND contype = 'p'", table
    )
    key = ", ".join((*columns, "partition"))
    await con.execute(
        f"""
        CREATE UNIQUE INDEX {table}_key_new ON {table} ({key});
        ALTER TABLE {table} DROP CONSTRAINT "{constraint}",
            ADD CONSTRAINT "{constraint}" PRIMARY KEY USING INDEX {table}_key_new;
        """
    )


async def _partition_keys(con: Connection, partitions: int) -> None:
    """17: every table a write transaction writes carries the partition of what it holds, in
    its primary key, so that a database distributed by partition (Citus, see the README's
    "Running on Citus") runs every write transaction on one shard: ``things``, ``snapshots``,
    ``policies`` and the anomaly tables get a ``partition`` column (of the thing, or of the
    policy), ``ingest_progress`` the partition of its consumer; their keys and the journal's
    take ``partition`` after the columns they had, so every lookup by id keeps its index.

    Existing rows get the partition the writers compute (crc32 of the id, as migration 15 placed
    the journal's events); the rows are updated in place, the journal's are not touched (only
    its primary key index is built again).
    """
    partitions = await stored_partitions(con)  # placed by migration 15 (the database's count)
    await con.execute(
        "\n".join(f"ALTER TABLE {table} ADD COLUMN partition integer;" for table in PARTITIONED)
        + "ALTER TABLE ingest_progress ADD COLUMN partition integer;"
    )
    ids = await con.fetch(
        " UNION ".join(f"SELECT {column} AS id FROM {table}" for table, (column, _) in PARTITIONED.items())
    )
    if ids:
        # crc32 (partition_of) has no SQL counterpart: each id's partition is computed here.
        await con.execute("CREATE TEMPORARY TABLE key_partitions (id text, partition integer) ON COMMIT DROP")
        await con.copy_records_to_table(
            "key_partitions",
            records=[(r["id"], partition_of(partition_key(r["id"]), partitions)) for r in ids],
        )
        await con.execute("ANALYZE key_partitions")  # temporary tables are never analyzed on their own
        for table, (column, _) in PARTITIONED.items():
            await con.execute(
                f"UPDATE {table} t SET partition = k.partition FROM key_partitions k WHERE k.id = t.{column}"
            )
    consumers = await con.fetch("SELECT DISTINCT consumer FROM ingest_progress")
    if consumers:
        await con.execute(
            "UPDATE ingest_progress p SET partition = c.partition "
            "FROM unnest($1::text[], $2::int[]) AS c(consumer, partition) WHERE p.consumer = c.consumer",
            [r["consumer"] for r in consumers],
            [consumer_partition(r["consumer"], partitions) for r in consumers],
        )
    for table, (_, key) in PARTITIONED.items():
        await con.execute(f"ALTER TABLE {table} ALTER COLUMN partition SET NOT NULL")
        await _swap_key(con, table, key)
    await con.execute("ALTER TABLE ingest_progress ALTER COLUMN partition SET NOT NULL")
    for table, key in REKEYED.items():
        await _swap_key(con, table, key)
    # The heads are read in the partitions locked (a distributed database routes the read to
    # their shard); by id within them, the primary key's first column.
    await con.execute(
        """
        CREATE OR REPLACE FUNCTION twinstore_lock_and_heads(parts integer[], ids text[])
        RETURNS TABLE (id text, revision bigint, hash bytea)
        LANGUAGE plpgsql VOLATILE AS $$
        BEGIN
            PERFORM 1 FROM partition_heads h WHERE h.partition = any(parts) ORDER BY h.partition FOR UPDATE;
            RETURN QUERY SELECT t.id, t.revision, t.hash FROM things t
                WHERE t.id = any(ids) AND t.partition = any(parts);
        END
        $$;
        """
    )


MIGRATIONS: list[Migration] = [
    # 1: journal, projection, snapshots, relay cursor
    """
    CREATE TABLE journal (
        entity          text        NOT NULL,
        id              text        NOT NULL,
        revision        bigint      NOT NULL,
        position        bigint      GENERATED ALWAYS AS IDENTITY,
        ts              timestamptz NOT NULL,
        action          text        NOT NULL,
        path            text        NOT NULL,
        value           json,
        originator      text        NOT NULL,
        correlation_id  text,
        hash            bytea       NOT NULL,
        PRIMARY KEY (entity, id, revision)
    );
    CREATE INDEX journal_position ON journal (position);

    CREATE TABLE things (
        id          text        PRIMARY KEY,
        revision    bigint      NOT NULL,
        created     timestamptz,
        modified    timestamptz NOT NULL,
        policy_id   text,
        doc         jsonb,
        hash        bytea       NOT NULL
    ) WITH (fillfactor = 70);  -- room on the page for HOT updates of the projection
    CREATE INDEX things_namespace ON things (split_part(id, ':', 1));

    CREATE TABLE snapshots (
        entity      text        NOT NULL,
        id          text        NOT NULL,
        revision    bigint      NOT NULL,
        created     timestamptz,
        modified    timestamptz NOT NULL,
        doc         jsonb,
        PRIMARY KEY (entity, id, revision)
    );

    CREATE TABLE relay_cursor (
        name        text        PRIMARY KEY,
        position    bigint      NOT NULL
    );
    """,
    # 2: take the write lock and read the locked heads in one round trip. A VOLATILE
    # PL/pgSQL function takes a fresh snapshot for each query it runs (READ COMMITTED), so
    # the rows are read after the lock is held, never from before it.
    """
    CREATE FUNCTION twinstore_lock_and_heads(ids text[])
    RETURNS TABLE (id text, revision bigint, hash bytea)
    LANGUAGE plpgsql VOLATILE AS $$
    BEGIN
        PERFORM pg_advisory_xact_lock(7242002);
        RETURN QUERY SELECT t.id, t.revision, t.hash FROM things t WHERE t.id = any(ids);
    END
    $$;
    """,
    # 3: policies (projection of the journal's 'policy' entity); things by policy for fan-out
    """
    CREATE TABLE policies (
        id          text        PRIMARY KEY,
        revision    bigint      NOT NULL,
        created     timestamptz,
        modified    timestamptz NOT NULL,
        doc         jsonb,
        hash        bytea       NOT NULL
    );
    CREATE INDEX things_policy ON things (policy_id);
    """,
    # 4: who may read something of the things of a policy (search narrows to these policies)
    """
    ALTER TABLE policies ADD COLUMN readers text[] NOT NULL DEFAULT '{}';
    CREATE INDEX policies_readers ON policies USING gin (readers);
    """,
    # 5: search (twinstore.store.rql_sql): eq on a path compiles to an exact check AND-ed with
    # `doc @> ...`, which this index answers; sorting and ranges on ids use code point order
    """
    CREATE INDEX things_doc ON things USING gin (doc jsonb_path_ops);
    CREATE INDEX things_id_c ON things (id COLLATE "C");
    """,
    # 6: per policy, the subjects that may read *every* part of its things (READ granted on
    # thing:/, without expiry, and no READ revoked anywhere in thing: for them): for those,
    # search and count run the whole filter in SQL (twinstore.search). The others that read
    # something (partial_readers), and those named by a READ revoke, take the policy-aware path.
    # Generated from the document, so every write and every existing row has them.
    """
    CREATE FUNCTION twinstore_read_revokers(doc jsonb) RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT coalesce(array_agg(DISTINCT s.key ORDER BY s.key), '{}')
        FROM jsonb_each(CASE WHEN jsonb_typeof(doc -> 'entries') = 'object' THEN doc -> 'entries' END) e,
             jsonb_each(CASE WHEN jsonb_typeof(e.value -> 'resources') = 'object'
                        THEN e.value -> 'resources' END) r,
             jsonb_each(CASE WHEN jsonb_typeof(e.value -> 'subjects') = 'object'
                        THEN e.value -> 'subjects' END) s
        WHERE r.key LIKE 'thing:%' AND coalesce(r.value -> 'revoke' ? 'READ', false)
    $$;
    CREATE FUNCTION twinstore_full_readers(doc jsonb) RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT coalesce(array_agg(DISTINCT s.key ORDER BY s.key), '{}')
        FROM jsonb_each(CASE WHEN jsonb_typeof(doc -> 'entries') = 'object' THEN doc -> 'entries' END) e,
             jsonb_each(CASE WHEN jsonb_typeof(e.value -> 'resources') = 'object'
                        THEN e.value -> 'resources' END) r,
             jsonb_each(CASE WHEN jsonb_typeof(e.value -> 'subjects') = 'object'
                        THEN e.value -> 'subjects' END) s
        WHERE r.key ~ '^thing:/+$' AND coalesce(r.value -> 'grant' ? 'READ', false)
          AND NOT coalesce(s.value ? 'expiry', false)
          AND s.key <> ALL (twinstore_read_revokers(doc))
    $$;
    CREATE FUNCTION twinstore_minus(a text[], b text[]) RETURNS text[]
    LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
        SELECT coalesce(array_agg(x ORDER BY x), '{}') FROM unnest(a) AS x WHERE x <> ALL (b)
    $$;
    ALTER TABLE policies
        ADD COLUMN full_readers text[] NOT NULL GENERATED ALWAYS AS (twinstore_full_readers(doc)) STORED,
        ADD COLUMN read_revokers text[] NOT NULL GENERATED ALWAYS AS (twinstore_read_revokers(doc)) STORED,
        ADD COLUMN partial_readers text[] NOT NULL
            GENERATED ALWAYS AS (twinstore_minus(readers, twinstore_full_readers(doc))) STORED;
    CREATE INDEX policies_partial_readers ON policies USING gin (partial_readers);
    CREATE INDEX policies_read_revokers ON policies USING gin (read_revokers);
    -- search joins every candidate thing with these columns: index-only, a fifth of the table
    CREATE INDEX policies_access ON policies (id) INCLUDE (readers, full_readers, read_revokers);
    """,
    # audit checkpoints: sealed chain heads (twinstore.audit), heads = [[entity, id, revision, hash hex]]
    """
    CREATE TABLE audit_checkpoints (
        id                bigserial   PRIMARY KEY,
        created           timestamptz NOT NULL DEFAULT now(),
        journal_position  bigint      NOT NULL,
        heads             jsonb       NOT NULL,
        root              bytea       NOT NULL,
        signature         bytea,
        key_id            text
    );
    """,
    # ingestion (twinstore.ingest): headers kept with an event (source timestamp, quality, source
    # and its sequence; hashed with the row when present), and per ingest partition the last
    # applied JetStream sequence (source '') and the last applied sequence of each source,
    # written in the same transaction as the events (exactly once, in order; see the module)
    """
    ALTER TABLE journal ADD COLUMN headers jsonb;
    CREATE TABLE ingest_progress (
        consumer    text        NOT NULL,
        source      text        NOT NULL,
        seq         bigint      NOT NULL,
        updated     timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (consumer, source)
    );
    """,
    # history retention (twinstore.retention): every cleanup run (journal_cleanups: who, the
    # cutoff, the bound it respected, what it removed, a digest over the anchors it set, signed
    # like checkpoints) and per entity and run the chain anchor left behind (journal_retention:
    # the last removed revision, its hash, when it was written, the digest of the snapshot kept
    # at that revision); append-only, the newest anchor of an entity is the current one.
    # journal_ts: the revision at a time is found by descending (entity, id, ts) (index only)
    # instead of walking the whole newer history backwards.
    """
    CREATE TABLE journal_cleanups (
        id                bigserial   PRIMARY KEY,
        started           timestamptz NOT NULL DEFAULT now(),
        finished          timestamptz,
        cutoff            timestamptz NOT NULL,
        checkpoint_id     bigint      NOT NULL,
        journal_position  bigint      NOT NULL,
        scope             text        NOT NULL,
        run_by            text        NOT NULL,
        db_user           text        NOT NULL DEFAULT current_user,
        entities          bigint      NOT NULL DEFAULT 0,
        events            bigint      NOT NULL DEFAULT 0,
        snapshots         bigint      NOT NULL DEFAULT 0,
        digest            bytea       NOT NULL,
        signature         bytea,
        key_id            text
    );
    CREATE TABLE journal_retention (
        entity         text        NOT NULL,
        id             text        NOT NULL,
        revision       bigint      NOT NULL,
        hash           bytea       NOT NULL,
        ts             timestamptz NOT NULL,
        snapshot_hash  bytea       NOT NULL,
        cleanup_id     bigint      NOT NULL,
        seq            bigint      NOT NULL,
        PRIMARY KEY (entity, id, revision),
        UNIQUE (cleanup_id, seq)
    );
    CREATE INDEX journal_ts ON journal (entity, id, ts, revision);
    """,
    # 10: anomaly detection (twinstore.anomaly.worker): detectors per feature, their state and
    # the anomalies found. Keys lead with the thing id.
    """
    CREATE TABLE anomaly_detectors (
        thing_id    text        NOT NULL,
        feature_id  text        NOT NULL,
        config      jsonb       NOT NULL,
        created     timestamptz NOT NULL DEFAULT now(),
        modified    timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (thing_id, feature_id)
    );
    CREATE TABLE anomaly_state (
        thing_id    text             NOT NULL,
        feature_id  text             NOT NULL,
        revision    bigint           NOT NULL,  -- the last thing revision scored
        state       bytea,                      -- the detector's checkpoint
        score       double precision,
        threshold   double precision,
        anomalous   boolean          NOT NULL DEFAULT false,
        scored_at   timestamptz,
        PRIMARY KEY (thing_id, feature_id)
    );
    CREATE TABLE anomalies (
        thing_id       text             NOT NULL,
        feature_id     text             NOT NULL,
        revision       bigint           NOT NULL,
        ts             timestamptz      NOT NULL,
        score          double precision NOT NULL,
        threshold      double precision NOT NULL,
        contributions  jsonb            NOT NULL,
        label          text,
        labelled_by    text,
        labelled_at    timestamptz,
        PRIMARY KEY (thing_id, feature_id, revision)
    );
    CREATE INDEX anomalies_ts ON anomalies (thing_id, feature_id, ts DESC, revision DESC);
    """,
    # 11: anomaly labels feed the detectors: the scored values of each anomaly are kept, and a
    # false-alarm label waits (partial index, empty when nothing waits) until its detector learnt it.
    """
    ALTER TABLE anomalies ADD COLUMN x jsonb, ADD COLUMN fed boolean NOT NULL DEFAULT false;
    CREATE INDEX anomalies_feedback ON anomalies (thing_id) WHERE label = 'false-alarm' AND NOT fed;
    """,
    # 12: detectors for every feature with a definition (twinstore.anomaly.rules)
    """
    CREATE TABLE anomaly_rules (
        definition  text        PRIMARY KEY,
        config      jsonb       NOT NULL,
        subjects    text[]      NOT NULL,  -- who put it: it attaches where they may WRITE
        created     timestamptz NOT NULL DEFAULT now(),
        modified    timestamptz NOT NULL DEFAULT now()
    );
    ALTER TABLE anomaly_detectors ADD COLUMN rule text;
    CREATE INDEX anomaly_detectors_rule ON anomaly_detectors (rule) WHERE rule IS NOT NULL;
    """,
    # 13: the deletions of whole things end their lives (a deleted id may be created again by
    # anyone): history reads find them per thing without walking its whole history
    # (twinstore.service.ThingService.history_access). Few rows: one per deletion.
    """
    CREATE INDEX journal_thing_deletions ON journal (id, revision)
        WHERE entity = 'thing' AND action = 'deleted' AND path ~ '^/*$';
    """,
    # 14: anomaly rules per owner (the subject that put it): one caller's rule for a definition no
    # longer blocks the definition for everyone else; a rule's detectors name the rule's owner.
    """
    ALTER TABLE anomaly_rules ADD COLUMN owner text;
    UPDATE anomaly_rules SET owner = coalesce(subjects[1], '');
    ALTER TABLE anomaly_rules ALTER COLUMN owner SET NOT NULL;
    ALTER TABLE anomaly_rules DROP CONSTRAINT anomaly_rules_pkey;
    ALTER TABLE anomaly_rules ADD PRIMARY KEY (definition, owner);
    ALTER TABLE anomaly_detectors ADD COLUMN rule_owner text;
    UPDATE anomaly_detectors d SET rule_owner = r.owner FROM anomaly_rules r WHERE d.rule = r.definition;
    DROP INDEX anomaly_detectors_rule;
    CREATE INDEX anomaly_detectors_rule ON anomaly_detectors (rule, rule_owner) WHERE rule IS NOT NULL;
    """,
    # 15: partitioned journal (see _partition_journal)
    _partition_journal,
    # 16: lock the batch's partitions (ascending: deadlock-free) and read the heads of its things
    # in one round trip. A VOLATILE PL/pgSQL function takes a fresh snapshot for each query it
    # runs (READ COMMITTED), so the heads are read after the locks are held, never from before.
    """
    CREATE FUNCTION twinstore_lock_and_heads(parts integer[], ids text[])
    RETURNS TABLE (id text, revision bigint, hash bytea)
    LANGUAGE plpgsql VOLATILE AS $$
    BEGIN
        PERFORM 1 FROM partition_heads h WHERE h.partition = any(parts) ORDER BY h.partition FOR UPDATE;
        RETURN QUERY SELECT t.id, t.revision, t.hash FROM things t WHERE t.id = any(ids);
    END
    $$;
    """,
    # 17: partitions in the keys of every table a write transaction writes (see _partition_keys)
    _partition_keys,
]


class PartitionsMismatchError(RuntimeError):
    """The configured partition count is not the one the database was created with."""

CREATE_MIGRATIONS = """
CREATE TABLE IF NOT EXISTS twinstore_migrations (
    version  integer     PRIMARY KEY,
    applied  timestamptz NOT NULL DEFAULT now()
)
"""


async def migrate(conn: Connection, partitions: int | None = None) -> int:
    """Apply missing migrations in one transaction; returns the schema version.

    ``partitions`` is the journal's partition count: used when the database gets its partitions
    (a new one, or one upgraded from before them; default 64), then checked on every start
    (:class:`PartitionsMismatchError`: it cannot change once events are placed by it). ``None``
    accepts the database's.

    A transaction-scoped advisory lock makes concurrent callers wait for each other, so N
    processes starting together apply each migration exactly once.
    """
    if partitions is not None and not 1 <= partitions <= MAX_PARTITIONS:
        raise ValueError(f"partitions must be 1..{MAX_PARTITIONS}")
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await conn.execute(CREATE_MIGRATIONS)
        applied = await conn.fetchval("SELECT coalesce(max(version), 0) FROM twinstore_migrations")
        for version, migration in enumerate(MIGRATIONS, start=1):
            if version <= applied:
                continue
            if isinstance(migration, str):
                await conn.execute(migration)
            else:
                await migration(conn, partitions or DEFAULT_PARTITIONS)
            await conn.execute("INSERT INTO twinstore_migrations (version) VALUES ($1)", version)
            log.info("applied migration", extra={"version": version})
        stored = await stored_partitions(conn)
        if partitions is not None and stored != partitions:
            raise PartitionsMismatchError(
                f"the database was created with {stored} partitions, the setting says {partitions}: "
                f"set partitions = {stored} (it cannot change once events are placed by it)"
            )
        return len(MIGRATIONS)


SELECT_PARTITIONS = "SELECT (value #>> '{}')::integer FROM twinstore_meta WHERE key = 'partitions'"


async def stored_partitions(conn: Connection) -> int:
    """The journal's partition count, stored in the database when it got its partitions."""
    return int(await conn.fetchval(SELECT_PARTITIONS))


async def current_version(conn: Connection) -> int:
    """The applied schema version (0 when never migrated)."""
    exists = await conn.fetchval("SELECT to_regclass('twinstore_migrations') IS NOT NULL")
    if not exists:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM twinstore_migrations"))


# Serialises adjusting the configured search indexes (processes starting together).
SEARCH_INDEX_LOCK = 7_242_004


async def ensure_search_indexes(conn: Connection, paths: list[tuple[str, ...]]) -> list[str]:
    """Make the configured search indexes exactly these (see ``rql_sql.index_statements``).

    Builds missing ones without blocking writes (``CONCURRENTLY``; an invalid leftover of an
    interrupted build is rebuilt) and drops those of paths no longer configured, with their
    statistics (``rql_sql.statistics_statements``); analyzes ``things`` when it added any.
    Returns the names created. Processes starting together take turns (session advisory lock).
    """
    indexes: dict[str, str] = {}
    statistics: dict[str, str] = {}
    for parts in paths:
        indexes.update(index_statements(parts))
        statistics.update(statistics_statements(parts))
    created: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", SEARCH_INDEX_LOCK)
    try:
        rows = await conn.fetch(
            "SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = 'things'::regclass AND c.relname LIKE 'things\\_sx\\_%'"
        )
        present = {r["relname"]: r["indisvalid"] for r in rows}
        for name, valid in present.items():
            if name not in indexes or not valid:
                await conn.execute(f'DROP INDEX CONCURRENTLY IF EXISTS "{name}"')
                log.info("dropped search index", extra={"index": name})
        for name, statement in indexes.items():
            if not present.get(name, False):
                await conn.execute(statement)
                created.append(name)
                log.info("created search index", extra={"index": name})
        rows = await conn.fetch(
            "SELECT stxname FROM pg_statistic_ext WHERE stxrelid = 'things'::regclass "
            "AND stxname LIKE 'things\\_sx\\_%'"
        )
        present_statistics = {r["stxname"] for r in rows}
        for name in present_statistics - set(statistics):
            await conn.execute(f'DROP STATISTICS IF EXISTS "{name}"')
        for name, statement in statistics.items():
            if name not in present_statistics:
                await conn.execute(statement)
                created.append(name)
        if created:
            await conn.execute("ANALYZE things")
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", SEARCH_INDEX_LOCK)
    return created
