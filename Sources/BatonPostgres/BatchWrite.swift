import BatonCore

// The batch write: what one batch (or sweep) writes, the one statement that writes it, and the
// parameters that statement numbers ($1 to $29, and $30 to $43 for the lines), side by side so that a
// parameter and its place in the SQL are read and changed together (StoreRowsTests compares each
// statement's highest $n with the parameters built for it).

/// Everything one batch (or sweep) writes, in the one fenced statement ``BatchWrite/statement``: buffers by
/// compare-and-set on the token and version read, idempotency records, outbox rows.
struct BatchWrite {
    let partition: Int
    let epoch: Int64
    let now: Timestamp
    /// Changed buffers, sorted (a fixed order keeps concurrent writers from deadlocking), with the state
    /// to write and the token and version they had when read (version 0: absent, to be inserted).
    var buffers: [(buffer: ExactString, state: BufferState, expectedToken: Int64, expectedVersion: Int64)] = []
    var records: [RequestRecord] = []
    /// Changes in decision order, with the request that made each (nil for expiries).
    var changes: [AttributedChange] = []
    /// Leases this write makes that the lease sweep's schedule may not cover yet: every grant (a new
    /// token), and every lease whose end moves earlier than it was (a renewal or a re-claim with a shorter
    /// lease), with their ends (``ExpirySchedule``).
    var leases: [(buffer: ExactString, end: Int64)] = []
    /// Waiters that left their lines (by request id), joined them (in order), or moved their reply address.
    var waitersRemoved: [String] = []
    var waitersAdded: [(buffer: String, waiter: Waiter)] = []
    var waitersMoved: [Waiter] = []

    var isEmpty: Bool { buffers.isEmpty && records.isEmpty && changes.isEmpty }

    /// The line differences between `initial` and `after` of the written buffers.
    mutating func lines(from initial: [ExactString: BufferState]) {
        for (buffer, state) in buffers.map({ ($0.buffer, $0.state) }) {
            let before = initial[buffer]?.line ?? []
            let beforeIDs = Dictionary(before.map { (ExactString($0.requestID), $0) }, uniquingKeysWith: { first, _ in first })
            let afterIDs = Set(state.line.map { ExactString($0.requestID) })
            waitersRemoved += before.filter { !afterIDs.contains(ExactString($0.requestID)) }.map(\.requestID)
            for waiter in state.line {
                if let old = beforeIDs[ExactString(waiter.requestID)] {
                    if old != waiter { waitersMoved.append(waiter) }
                } else {
                    waitersAdded.append((buffer.string, waiter))
                }
            }
        }
    }

    /// Whether a line changes: then the write is ``statementWithLines`` ($1 to $43), else ``statement`` ($1 to $29).
    var changesLines: Bool { !(waitersRemoved.isEmpty && waitersAdded.isEmpty && waitersMoved.isEmpty) }

    /// The statement that writes this.
    var statement: PreparedStatement { changesLines ? Self.statementWithLines : Self.statement }

    /// The parameters of ``statement``, in its numbering ($1 to $29; with lines, $1 to $43).
    var parameters: [String?] {
        changesLines ? baseParameters + lineParameters : baseParameters
    }

    private var baseParameters: [String?] {
        let list = changes.map(\.change)
        let states = buffers.map(\.state)
        return [
            /* $1 */ String(partition), /* $2 */ String(now.milliseconds),
            /* $3-$9: buffers */
            PostgresArray.text(buffers.map(\.buffer.string)),
            PostgresArray.text(states.map { $0.holder?.user }),
            PostgresArray.text(states.map { $0.holder?.connection }),
            PostgresArray.integers(states.map { Optional($0.token) }),
            PostgresArray.integers(states.map { $0.expiresAt?.milliseconds }),
            PostgresArray.integers(buffers.map { Optional($0.expectedToken) }),
            PostgresArray.integers(buffers.map { Optional($0.expectedVersion) }),
            /* $10-$11: records */
            PostgresArray.text(records.map(\.id)),
            PostgresArray.text(records.map { String(decoding: ProtocolCodec.encode($0.reply), as: UTF8.self) }),
            /* $12-$19: outbox */
            PostgresArray.text(list.map(\.kind.rawValue)),
            PostgresArray.text(list.map(\.buffer)),
            PostgresArray.text(list.map(\.holder.user)),
            PostgresArray.text(list.map(\.holder.connection)),
            PostgresArray.integers(list.map { Optional($0.token) }),
            PostgresArray.integers(list.map { Optional($0.at.milliseconds) }),
            PostgresArray.integers(list.map { Optional($0.expiresAt.milliseconds) }),
            PostgresArray.text(changes.map(\.requestID)),
            /* $20 */ String(epoch), /* $21 */ String(buffers.count), /* $22 */ String(records.count),
            /* $23 */ "{" + list.map { $0.forced ? "t" : "f" }.joined(separator: ",") + "}",
            /* $24 */ PostgresArray.text(states.map(\.principal)),
            /* $25 */ PostgresArray.text(records.map(\.fingerprint)),
            /* $26 */ PostgresArray.text(list.map(\.principal)),
            /* $27 */ PostgresArray.integers(states.map { Optional($0.issued) }),
            /* $28 */ PostgresArray.text(states.map(\.roster.storedText)),
            /* $29 */ PostgresArray.integers(list.map { $0.replicaID.map(Int64.init) }),
        ]
    }

    private var lineParameters: [String?] {
        [
            /* $30 */ PostgresArray.text(waitersRemoved),
            /* $31-$40: waiters that joined */
            PostgresArray.text(waitersAdded.map(\.buffer)),
            PostgresArray.text(waitersAdded.map(\.waiter.requestID)),
            PostgresArray.text(waitersAdded.map(\.waiter.holder.user)),
            PostgresArray.text(waitersAdded.map(\.waiter.holder.connection)),
            PostgresArray.text(waitersAdded.map(\.waiter.principal)),
            PostgresArray.integers(waitersAdded.map { Optional($0.waiter.leaseMilliseconds) }),
            PostgresArray.integers(waitersAdded.map { Optional($0.waiter.waitUntil.milliseconds) }),
            PostgresArray.text(waitersAdded.map(\.waiter.replyTo)),
            PostgresArray.text(waitersAdded.map(\.waiter.correlationID)),
            PostgresArray.text(waitersAdded.map(\.waiter.fingerprint)),
            /* $41-$43: waiters that moved their reply address */
            PostgresArray.text(waitersMoved.map(\.requestID)),
            PostgresArray.text(waitersMoved.map(\.replyTo)),
            PostgresArray.text(waitersMoved.map(\.correlationID)),
        ]
    }

    /// Checks the statement's result row (`written, recorded, outbox ids, epoch, abort, clock`) and returns
    /// the outbox ids, in the order of `changes`, and the database clock read at the statement's end.
    ///
    /// - Throws: ``StoreError`` when the fence was lost, ``CompareAndSetMiss`` when another writer changed
    ///   a buffer or recorded a request id first.
    func check(_ row: PostgresRow) throws -> (ids: [Int64], clock: Timestamp) {
        try OwnershipStore.checkEpoch(try row.optional(3, "epoch").map { _ in try row.decode(3, "epoch") }, partition: partition, epoch: epoch)
        let written: Int = try row.decode(0, "rows written")
        let recorded: Int = try row.decode(1, "records written")
        guard written == buffers.count, recorded == records.count else {
            throw CompareAndSetMiss(missed: buffers.count - written + records.count - recorded)
        }
        return (PostgresArray.parseIntegers(try row.optional(2, "outbox ids")), try row.timestamp(5, "clock"))
    }
}

extension BatchWrite {
    // One statement for every write of a batch, atomic on its own. It is fenced: it locks the
    // partition row FOR SHARE (an epoch bump waits for it; under READ COMMITTED a bump committed
    // meanwhile is seen) and writes nothing unless the epoch is still $20. Updates and inserts are
    // compare-and-set: an update needs the token and version the decision read, an insert needs the
    // buffer to be still absent, an idempotency record needs its request id to be still free. The
    // caller compares the counts with what it expected and decides again from a fresh read on a miss.
    static let statement = PreparedStatement(name: "baton_write", sql: writeCTEs + "\n" + writeResult)

    // The batch write with the lines' changes too (claims that joined, left or moved their reply address):
    // only batches that change a line pay for the three more statements.
    static let statementWithLines = PreparedStatement(name: "baton_write_lines", sql: writeCTEs + ",\n" + waiterCTEs + "\n" + writeResult)

    private static let writeCTEs = """
        WITH fence AS (
            SELECT epoch FROM baton_partitions WHERE partition = $1 FOR SHARE
        ),
        input AS (
            SELECT * FROM unnest($3::text[], $4::text[], $5::text[], $6::int8[], $7::int8[], $8::int8[], $9::int8[], $24::text[], $27::int8[], $28::text[])
                AS i(buffer, holder_user, holder_connection, token, expires_ms, expected_token, expected_version, holder_principal, issued, roster)
            WHERE (SELECT epoch FROM fence) = $20
        ),
        -- The rows to update, found by one key probe each (see BatchRead), and updated by their row id. The
        -- compare-and-set is the version and token checked again in the UPDATE: under READ COMMITTED a row
        -- another writer changed since is followed to its newest version and the WHERE clause rechecked,
        -- and every write moves the version, so such a row is not updated and the counts miss.
        targets AS (
            SELECT i.*, r.row_id FROM input i
            CROSS JOIN LATERAL (
                SELECT ctid AS row_id FROM baton_buffers
                WHERE partition = $1 AND buffer = i.buffer AND version = i.expected_version AND token = i.expected_token OFFSET 0
            ) r
            WHERE i.expected_version > 0
        ),
        updated AS (
            UPDATE baton_buffers b
            SET holder_user = t.holder_user, holder_connection = t.holder_connection, token = t.token,
                holder_principal = t.holder_principal, issued = t.issued, roster = t.roster::jsonb,
                expires_at = timestamptz 'epoch' + t.expires_ms * interval '1 millisecond',
                version = b.version + 1,
                updated_at = timestamptz 'epoch' + $2::int8 * interval '1 millisecond'
            FROM targets t
            WHERE b.ctid = t.row_id AND b.buffer = t.buffer AND b.version = t.expected_version AND b.token = t.expected_token
            RETURNING 1
        ),
        inserted AS (
            INSERT INTO baton_buffers (partition, buffer, holder_user, holder_connection, token, expires_at, version, updated_at, holder_principal, issued, roster)
            SELECT $1, i.buffer, i.holder_user, i.holder_connection, i.token,
                   timestamptz 'epoch' + i.expires_ms * interval '1 millisecond', 1,
                   timestamptz 'epoch' + $2::int8 * interval '1 millisecond', i.holder_principal, i.issued, i.roster::jsonb
            FROM input i WHERE i.expected_version = 0
            ON CONFLICT (partition, buffer) DO NOTHING
            RETURNING 1
        ),
        recorded AS (
            INSERT INTO baton_requests (partition, request_id, reply, fingerprint)
            SELECT $1, r.request_id, r.reply, r.fingerprint FROM unnest($10::text[], $11::text[], $25::text[]) AS r(request_id, reply, fingerprint)
            WHERE (SELECT epoch FROM fence) = $20
            ON CONFLICT (partition, request_id) DO NOTHING
            RETURNING 1
        ),
        outbox AS (
            INSERT INTO baton_outbox (partition, kind, buffer, holder_user, holder_connection, token, at, expires_at, request_id, forced, principal, replica_id)
            SELECT $1, o.kind, o.buffer, o.holder_user, o.holder_connection, o.token,
                   timestamptz 'epoch' + o.at_ms * interval '1 millisecond',
                   timestamptz 'epoch' + o.expires_ms * interval '1 millisecond', o.request_id, o.forced, o.principal, o.replica_id
            FROM unnest($12::text[], $13::text[], $14::text[], $15::text[], $16::int8[], $17::int8[], $18::int8[], $19::text[], $23::bool[], $26::text[], $29::int4[])
                WITH ORDINALITY AS o(kind, buffer, holder_user, holder_connection, token, at_ms, expires_ms, request_id, forced, principal, replica_id, n)
            WHERE (SELECT epoch FROM fence) = $20
            ORDER BY o.n
            RETURNING id
        )
        """

    private static let waiterCTEs = """
        waiters_removed AS (
            DELETE FROM baton_waiters w
            USING unnest($30::text[]) AS r(request_id)
            CROSS JOIN LATERAL (SELECT ctid AS row_id FROM baton_waiters WHERE partition = $1 AND request_id = r.request_id OFFSET 0) found
            WHERE (SELECT epoch FROM fence) = $20 AND w.ctid = found.row_id AND w.request_id = r.request_id
            RETURNING 1
        ),
        waiters_added AS (
            INSERT INTO baton_waiters (partition, buffer, request_id, holder_user, holder_connection, principal, lease_ms, wait_until, reply_to, correlation_id, fingerprint)
            SELECT $1, a.buffer, a.request_id, a.holder_user, a.holder_connection, a.principal, a.lease_ms,
                   timestamptz 'epoch' + a.until_ms * interval '1 millisecond', a.reply_to, a.correlation_id, a.fingerprint
            FROM unnest($31::text[], $32::text[], $33::text[], $34::text[], $35::text[], $36::int8[], $37::int8[], $38::text[], $39::text[], $40::text[])
                WITH ORDINALITY AS a(buffer, request_id, holder_user, holder_connection, principal, lease_ms, until_ms, reply_to, correlation_id, fingerprint, n)
            WHERE (SELECT epoch FROM fence) = $20
            ORDER BY a.n
            RETURNING 1
        ),
        waiters_moved AS (
            UPDATE baton_waiters w SET reply_to = m.reply_to, correlation_id = m.correlation_id
            FROM unnest($41::text[], $42::text[], $43::text[]) AS m(request_id, reply_to, correlation_id)
            CROSS JOIN LATERAL (SELECT ctid AS row_id FROM baton_waiters WHERE partition = $1 AND request_id = m.request_id OFFSET 0) found
            WHERE (SELECT epoch FROM fence) = $20 AND w.ctid = found.row_id AND w.request_id = m.request_id
            RETURNING 1
        )
        """

    private static let writeResult = """
        SELECT (SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted),
               (SELECT count(*) FROM recorded),
               (SELECT array_agg(id ORDER BY id) FROM outbox),
               (SELECT epoch FROM fence),
               CASE WHEN (SELECT epoch FROM fence) = $20
                     AND ((SELECT count(*) FROM updated) + (SELECT count(*) FROM inserted) <> $21
                          OR (SELECT count(*) FROM recorded) <> $22)
                    THEN baton_abort_batch('compare-and-set miss: another writer changed a buffer or recorded a request id first')
               END,
               floor(extract(epoch FROM clock_timestamp()) * 1000)::int8
        """
}
