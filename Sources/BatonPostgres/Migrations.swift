import BatonCore
import Logging

/// One versioned schema change.
public struct Migration: Sendable {
    /// The version, recorded in `baton_schema_migrations` once applied.
    public let version: Int
    /// A short name.
    public let name: String
    /// The SQL, run in its own transaction.
    public let sql: String
}

/// Errors about the schema and the deployment's partition count.
public struct SchemaError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure; extensible.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private let name: String
        private init(_ name: String) { self.name = name }

        /// The database was set up for another partition count N.
        public static let partitionCountMismatch = Code("partition count mismatch")
        /// The schema is older or newer than this build's (run `baton migrate`, or upgrade the binary).
        public static let versionMismatch = Code("schema version mismatch")
        /// The database was never migrated.
        public static let notMigrated = Code("not migrated")

        public var description: String { name }
    }

    /// What kind of failure.
    public let code: Code
    /// What went wrong, for a person.
    public let message: String

    public var description: String { message }

    static func partitionCountMismatch(database: Int, requested: Int) -> SchemaError {
        SchemaError(code: .partitionCountMismatch, message: """
            the database was set up for \(database) partitions but this run asked for \(requested): \
            N is fixed per deployment, so pass --partition-count \(database) (or BATON_PARTITION_COUNT=\(database)), \
            or follow the drain procedure in docs/operations.md to change it
            """)
    }
}

/// Applies Baton's migrations: each in its own transaction, recorded in
/// `baton_schema_migrations`, serialized across processes by an advisory lock.
public enum Migrator {
    /// The advisory lock key that serializes migrations (an arbitrary constant: "baton" in ASCII).
    static let lockKey = "435491328110"

    /// Every migration, in order.
    public static let migrations: [Migration] = [
        Migration(version: 1, name: "ownership store", sql: """
            -- The deployment: its partition count N, fixed for its lifetime.
            CREATE TABLE baton_meta (
                singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
                partition_count integer NOT NULL CHECK (partition_count BETWEEN 1 AND 1024),
                created_at timestamptz NOT NULL DEFAULT now()
            );

            -- One row per partition: the fencing epoch (Temporal's range_id). Every batch
            -- locks its partition's row FOR SHARE and checks the epoch; taking the
            -- partition bumps it (UPDATE, which waits for in-flight batches).
            CREATE TABLE baton_partitions (
                partition integer PRIMARY KEY,
                epoch bigint NOT NULL DEFAULT 0,
                owner text,
                taken_at timestamptz
            );

            -- One row per buffer ever claimed. token = the last token issued; the holder
            -- columns are all NULL when released or expired-and-swept. version grows on
            -- every write and, with token, is the compare-and-set guard.
            -- Hot queries and their indexes:
            --   batch read and CAS write by (partition, buffer)    -> primary key
            --   release_connection: (partition, holder_connection) -> baton_buffers_connection
            --   lease sweep: (partition, expires_at) of live rows  -> baton_buffers_expiry
            CREATE TABLE baton_buffers (
                partition integer NOT NULL,
                buffer text NOT NULL,
                holder_user text,
                holder_connection text,
                token bigint NOT NULL CHECK (token >= 0),
                expires_at timestamptz,
                version bigint NOT NULL CHECK (version >= 1),
                updated_at timestamptz NOT NULL,
                PRIMARY KEY (partition, buffer),
                CHECK ((holder_user IS NULL) = (holder_connection IS NULL)
                       AND (holder_connection IS NULL) = (expires_at IS NULL))
            );
            CREATE INDEX baton_buffers_connection ON baton_buffers (partition, holder_connection)
                WHERE holder_connection IS NOT NULL;
            CREATE INDEX baton_buffers_expiry ON baton_buffers (partition, expires_at)
                WHERE holder_connection IS NOT NULL;

            -- Idempotency: the reply to every request id, per partition (release_connection
            -- reuses one id on every partition). Lookups by primary key; pruning by
            -- baton_requests_created.
            CREATE TABLE baton_requests (
                partition integer NOT NULL,
                request_id text NOT NULL,
                reply text NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now(),
                PRIMARY KEY (partition, request_id)
            );
            CREATE INDEX baton_requests_created ON baton_requests (created_at);

            -- Transactional outbox and audit trail: one row per ownership change, written
            -- in the batch's transaction. Publishing reads undelivered rows by
            -- baton_outbox_pending; pruning finds delivered rows by baton_outbox_delivered.
            CREATE TABLE baton_outbox (
                id bigserial PRIMARY KEY,
                partition integer NOT NULL,
                kind text NOT NULL CHECK (kind IN ('granted', 'released', 'expired')),
                buffer text NOT NULL,
                holder_user text NOT NULL,
                holder_connection text NOT NULL,
                token bigint NOT NULL,
                at timestamptz NOT NULL,
                expires_at timestamptz NOT NULL,
                request_id text,
                delivered_at timestamptz
            );
            CREATE INDEX baton_outbox_pending ON baton_outbox (partition, id) WHERE delivered_at IS NULL;
            CREATE INDEX baton_outbox_delivered ON baton_outbox (delivered_at) WHERE delivered_at IS NOT NULL;
            """),
        Migration(version: 2, name: "abort a batch write on a compare-and-set miss", sql: """
            -- A batch's write is one statement outside any explicit transaction. When one of its
            -- compare-and-set conditions misses, the statement calls this to fail as a whole, so
            -- nothing of it is written (SQLSTATE BT001), and the worker decides again.
            CREATE FUNCTION baton_abort_batch(reason text) RETURNS bigint LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION USING ERRCODE = 'BT001', MESSAGE = reason;
            END
            $$;
            """),
        Migration(version: 3, name: "forced releases", sql: """
            -- A release forced by an operator (force_release) is marked in the audit trail and its event.
            ALTER TABLE baton_outbox ADD COLUMN forced boolean NOT NULL DEFAULT false;
            """),
        Migration(version: 4, name: "principals and request fingerprints", sql: """
            -- The broker user (AMQP user_id, checked by RabbitMQ) that claimed a lease: only it may extend,
            -- renew or release the lease. NULL for leases recorded before this migration (they can only
            -- expire or be force-released).
            ALTER TABLE baton_buffers ADD COLUMN holder_principal text;
            -- What a request id was used for (its body without deadline, plus its principal): a repeat is
            -- answered from the stored reply only when it asks the same thing. NULL for older records,
            -- which are answered as before.
            ALTER TABLE baton_requests ADD COLUMN fingerprint text;
            -- Who made each ownership change (NULL for expiries and older rows), for audits.
            ALTER TABLE baton_outbox ADD COLUMN principal text;
            """),
        Migration(version: 5, name: "event positions", sql: """
            -- An event's position (seq) is its outbox id: within a partition ids grow in commit order, because
            -- every write of a partition holds its row FOR SHARE and one writer decides at a time. The
            -- events op reads a partition's history from a position by this index.
            CREATE INDEX IF NOT EXISTS baton_outbox_position ON baton_outbox (partition, id);
            -- Up to which position each partition's history was pruned: a read from an older position has
            -- missed changes (reported as missed, not as an error).
            CREATE TABLE baton_outbox_pruned (
                partition integer PRIMARY KEY,
                through bigint NOT NULL
            );
            """),
        Migration(version: 6, name: "claims waiting in line", sql: """
            -- A buffer's line of claims that wait for it (docs/design/fair-waiting.md), in the order of
            -- position. Written in the batch statement under the epoch fence; every change of a line
            -- also rewrites its buffer's row (version + 1), so the buffer's compare-and-set guards it.
            CREATE TABLE baton_waiters (
                partition integer NOT NULL,
                buffer text NOT NULL,
                position bigserial,
                request_id text NOT NULL,
                holder_user text NOT NULL,
                holder_connection text NOT NULL,
                principal text,
                lease_ms bigint NOT NULL,
                wait_until timestamptz NOT NULL,
                reply_to text,
                correlation_id text,
                fingerprint text NOT NULL,
                PRIMARY KEY (partition, buffer, position)
            );
            CREATE UNIQUE INDEX baton_waiters_request ON baton_waiters (partition, request_id);
            CREATE INDEX baton_waiters_until ON baton_waiters (partition, wait_until);
            CREATE INDEX baton_waiters_connection ON baton_waiters (partition, holder_connection);
            """),
        Migration(version: 7, name: "a delivered position per partition", sql: """
            -- Which of a partition's changes were published (confirmed by the broker): every outbox row of the
            -- partition up to position `through`. Its event pump publishes the partition's changes in position
            -- order and moves this forward a few times a second, instead of marking each row (an update
            -- through two partial indexes per change, which cost as much database time as the decisions).
            CREATE TABLE baton_outbox_delivery (
                partition integer PRIMARY KEY,
                through bigint NOT NULL
            );
            INSERT INTO baton_outbox_delivery (partition, through)
            SELECT p.partition, coalesce(
                (SELECT min(o.id) - 1 FROM baton_outbox o WHERE o.partition = p.partition AND o.delivered_at IS NULL),
                (SELECT max(o.id) FROM baton_outbox o WHERE o.partition = p.partition),
                0)
            FROM baton_partitions p;
            -- Pruning walks each partition's history by position (baton_outbox_position) from where it last
            -- ended; delivered_at is no longer written (kept for workers of earlier versions during an upgrade).
            DROP INDEX baton_outbox_pending;
            DROP INDEX baton_outbox_delivered;
            """),
        Migration(version: 8, name: "renewals without index writes", sql: """
            -- The lease sweep reads the rows its worker's schedule says are due (by primary key): the worker,
            -- the partition's only writer, keeps the schedule (loaded from the live rows through
            -- baton_buffers_connection when it takes the partition). Without an index on expires_at a renewal
            -- changes no indexed column and is a heap-only (HOT) update; the free space a page keeps for them.
            DROP INDEX baton_buffers_expiry;
            ALTER TABLE baton_buffers SET (fillfactor = 85);
            -- Records are pruned by age, and rows are appended in about that order: a block-range index is
            -- enough for the prune, and costs almost nothing per insert.
            DROP INDEX baton_requests_created;
            CREATE INDEX baton_requests_created ON baton_requests USING brin (created_at);
            """),
        Migration(version: 9, name: "a buffer's token sequence apart from its holder's token", sql: """
            -- token is the holder's token (the last holder's once released); issued is the last token issued
            -- from the buffer's sequence, which replica memberships will share (docs/design/replica-slots.md).
            -- Readers take greatest(issued, token): NULL (every row written before this migration) means token,
            -- and a worker of an earlier version, which writes token alone, can never make the sequence go
            -- back. No rewrite of the table.
            ALTER TABLE baton_buffers ADD COLUMN issued bigint;
            """),
        Migration(version: 10, name: "replica memberships", sql: """
            -- A buffer's collaborators and the replica ids reserved for returning ones (docs/design/replica-slots.md),
            -- written with the buffer's row under its compare-and-set: {"m": [members], "r": [reservations]}
            -- (BatonCore's Roster.storedText). NULL for a buffer that never had members, so leases pay nothing:
            -- no index covers a column a lease changes, and a renewal stays a heap-only update.
            ALTER TABLE baton_buffers ADD COLUMN roster jsonb;
            -- release_connection finds a connection's memberships by containment (roster @> {"m": [{"c": ...}]}).
            CREATE INDEX baton_buffers_roster ON baton_buffers USING gin (roster jsonb_path_ops) WHERE roster IS NOT NULL;
            -- The sweep's schedule is loaded from the partition's rosters when the worker takes a partition.
            CREATE INDEX baton_buffers_rostered ON baton_buffers (partition) WHERE roster IS NOT NULL;
            """),
        Migration(version: 11, name: "membership changes in the history", sql: """
            -- Joins, leaves, expiries and releases of memberships are events of the partition's history like
            -- ownership changes (docs/protocol.md, section 20): the member as holder, its token and end, and
            -- its replica id.
            ALTER TABLE baton_outbox ADD COLUMN replica_id integer;
            ALTER TABLE baton_outbox DROP CONSTRAINT baton_outbox_kind_check;
            ALTER TABLE baton_outbox ADD CONSTRAINT baton_outbox_kind_check CHECK (kind IN (
                'granted', 'released', 'expired',
                'member_joined', 'member_reclaimed', 'member_left', 'member_expired', 'member_released'));
            """),
    ]

    /// The newest schema version this code knows.
    public static var latestVersion: Int { migrations.last!.version }

    /// Applies the missing migrations and checks the deployment's partition count.
    ///
    /// Safe to run twice and from several processes at once. The first run records
    /// `partitionCount`; a later run with another count fails with ``SchemaError``
    /// naming both, and changes nothing.
    ///
    /// - Returns: the versions applied by this call.
    @discardableResult
    public static func migrate(_ connection: PostgresConnection, partitionCount: Int, logger: Logger) async throws -> [Int] {
        try await connection.withSession { session in
            try session.query("SELECT pg_advisory_lock(\(lockKey))")
            defer { _ = try? session.query("SELECT pg_advisory_unlock(\(lockKey))") }
            try session.execute(script: """
                SET client_min_messages = warning;
                CREATE TABLE IF NOT EXISTS baton_schema_migrations (
                    version integer PRIMARY KEY,
                    name text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                );
                RESET client_min_messages;
                """)
            let done = Set(try session.query("SELECT version FROM baton_schema_migrations").decode(from: "baton_schema_migrations") { try $0.decode(0, "version", as: Int.self) })
            if let recorded = try recordedPartitionCount(session), recorded != partitionCount {
                throw SchemaError.partitionCountMismatch(database: recorded, requested: partitionCount)
            }
            var applied: [Int] = []
            for migration in migrations where !done.contains(migration.version) {
                try session.transaction {
                    try session.execute(script: migration.sql)
                    if migration.version == 1 {
                        try session.query("INSERT INTO baton_meta (partition_count) VALUES ($1)", [String(partitionCount)])
                        try session.query(
                            "INSERT INTO baton_partitions (partition) SELECT generate_series(0, $1::int - 1)",
                            [String(partitionCount)]
                        )
                    }
                    try session.query(
                        "INSERT INTO baton_schema_migrations (version, name) VALUES ($1, $2)",
                        [String(migration.version), migration.name]
                    )
                }
                logger.info("applied migration", metadata: ["baton.migration": "\(migration.version) \(migration.name)"])
                applied.append(migration.version)
            }
            return applied
        }
    }

    /// Checks that the schema is current and was set up for `partitionCount` partitions.
    public static func verify(_ session: PostgresSession, partitionCount: Int) throws {
        let exists = try session.query("SELECT to_regclass('baton_schema_migrations') IS NOT NULL").first() == "t"
        let version = exists ? Int(try session.query("SELECT max(version) FROM baton_schema_migrations").first() ?? "") : nil
        guard let version, version >= latestVersion else {
            throw SchemaError(code: version == nil ? .notMigrated : .versionMismatch, message: "the database schema is at version \(version.map(String.init) ?? "none"), this build needs \(latestVersion): run 'baton migrate' first")
        }
        guard let recorded = try recordedPartitionCount(session) else {
            throw SchemaError(code: .notMigrated, message: "the database has no partition count recorded: run 'baton migrate' first")
        }
        guard recorded == partitionCount else {
            throw SchemaError.partitionCountMismatch(database: recorded, requested: partitionCount)
        }
    }

    private static func recordedPartitionCount(_ session: PostgresSession) throws -> Int? {
        guard try session.query("SELECT to_regclass('baton_meta') IS NOT NULL").first() == "t" else { return nil }
        return try session.query("SELECT partition_count FROM baton_meta").first().flatMap(Int.init)
    }
}
