import BatonCore

/// The batch read: the one statement a batch reads its buffers, lines and stored replies with (when its
/// partition's memory cannot decide it), next to the parameters it numbers. Its rows are ``BatchReadRow``s.
enum BatchRead {
    // Everything a batch reads, in one statement (one round trip, one execution):
    // - `f`: the partition's epoch (to stop early when it was taken; the write re-checks it under a
    //   FOR SHARE lock), and the clock, read after the statement's snapshot, so a decision's time is
    //   never earlier than the commit of any change it saw;
    // - `r`: replies already given to the batch's request ids (baton_requests primary key);
    // - `b`: the rows of the batch's buffers (baton_buffers primary key) and of the buffers held by
    //   release_connection's connections and principals (baton_buffers_connection, filtered by holder_principal: only the requester's own).
    // Lookups are unnest + LATERAL probes behind `OFFSET 0`, which keeps the planner from pulling a probe
    // up into a join: a worker plans each statement once, maybe on an empty table, and without statistics
    // the planner joined the keys to a scan of the whole partition (hash join, or the partition's rows as
    // the outer side); an `= ANY($n)` filter did the same. Behind the fence each key is one index probe,
    // whatever the statistics (PartitionMemoryTests, "a write planned on an empty table").
    static let sql = PreparedStatement(name: "baton_read_batch", sql: """
        WITH fence AS (SELECT epoch FROM baton_partitions WHERE partition = $1),
        stored AS (
            SELECT r.request_id, r.reply, r.fingerprint FROM unnest($2::text[]) AS wanted(request_id)
            CROSS JOIN LATERAL (
                SELECT request_id, reply, fingerprint FROM baton_requests WHERE partition = $1 AND request_id = wanted.request_id OFFSET 0
            ) r
        ),
        found AS (
            SELECT b.* FROM unnest($3::text[]) AS wanted(buffer)
            CROSS JOIN LATERAL (SELECT * FROM baton_buffers WHERE partition = $1 AND buffer = wanted.buffer OFFSET 0) b
            UNION
            SELECT b.* FROM unnest($4::text[], $5::text[]) AS wanted(connection, principal)
            CROSS JOIN LATERAL (
                SELECT * FROM baton_buffers WHERE partition = $1 AND holder_connection IS NOT NULL AND holder_connection = wanted.connection
                    AND holder_principal IS NOT DISTINCT FROM wanted.principal OFFSET 0
            ) b
            UNION
            -- The buffers of the connection's waiters: a key probe per waiter (a semi-join planned on an empty
            -- table scans the partition's buffers).
            SELECT b.* FROM unnest($4::text[], $5::text[]) AS wanted(connection, principal)
            CROSS JOIN LATERAL (
                SELECT buffer FROM baton_waiters WHERE partition = $1 AND holder_connection = wanted.connection
                    AND principal IS NOT DISTINCT FROM wanted.principal OFFSET 0
            ) waiting
            CROSS JOIN LATERAL (SELECT * FROM baton_buffers WHERE partition = $1 AND buffer = waiting.buffer OFFSET 0) b
            UNION
            -- The connection's memberships, through baton_buffers_roster (partition + 0: the primary key is no
            -- way to them, so a plan made on an empty table cannot scan the partition instead).
            SELECT b.* FROM unnest($4::text[]) AS wanted(connection)
            CROSS JOIN LATERAL (
                SELECT * FROM baton_buffers WHERE roster IS NOT NULL
                    AND roster @> jsonb_build_object('m', jsonb_build_array(jsonb_build_object('c', wanted.connection)))
                    AND partition + 0 = $1 OFFSET 0
            ) b
        ),
        -- Not joined to found: a CTE referenced twice is materialized, and every batch would pay for it.
        -- One arm per index (an OR of them scans every waiter of the partition); UNION, not UNION ALL,
        -- so that a waiter found twice is read once.
        lines AS (
            SELECT w.* FROM unnest($3::text[]) AS wanted(buffer)
            CROSS JOIN LATERAL (SELECT * FROM baton_waiters WHERE partition = $1 AND buffer = wanted.buffer ORDER BY position OFFSET 0) w
            UNION
            SELECT w.* FROM unnest($4::text[], $5::text[]) AS wanted(connection, principal)
            CROSS JOIN LATERAL (
                SELECT * FROM baton_waiters WHERE partition = $1 AND holder_connection = wanted.connection AND principal IS NOT DISTINCT FROM wanted.principal OFFSET 0
            ) w
            UNION
            -- The lines of the connection's buffers: a probe per buffer (as above).
            SELECT w.* FROM unnest($4::text[], $5::text[]) AS wanted(connection, principal)
            CROSS JOIN LATERAL (
                SELECT buffer FROM baton_buffers WHERE partition = $1 AND holder_connection IS NOT NULL AND holder_connection = wanted.connection
                    AND holder_principal IS NOT DISTINCT FROM wanted.principal OFFSET 0
            ) held
            CROSS JOIN LATERAL (SELECT * FROM baton_waiters WHERE partition = $1 AND buffer = held.buffer ORDER BY position OFFSET 0) w
            UNION
            -- A waiting claim's request id, whatever buffer the request names: it may not be reused.
            SELECT w.* FROM unnest($2::text[]) AS wanted(request_id)
            CROSS JOIN LATERAL (SELECT * FROM baton_waiters WHERE partition = $1 AND request_id = wanted.request_id ORDER BY request_id OFFSET 0) w
        )
        SELECT 'f', (SELECT epoch FROM fence)::text, floor(extract(epoch FROM clock_timestamp()) * 1000)::int8::text,
               NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL
        UNION ALL
        SELECT 'r', request_id, reply, fingerprint, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL FROM stored
        UNION ALL
        SELECT 'b', buffer, holder_user, holder_connection, token::text,
               ((extract(epoch FROM expires_at) * 1000)::int8)::text, version::text, holder_principal, greatest(issued, token)::text, roster::text, NULL, NULL
        FROM found
        UNION ALL
        SELECT 'w', buffer, request_id, holder_user, holder_connection, principal, lease_ms::text,
               ((extract(epoch FROM wait_until) * 1000)::int8)::text, reply_to, correlation_id, fingerprint, position::text
        FROM lines
        """)

    /// The read of a batch of `requests` of `partition`: the statement and its parameters ($1 to $5).
    static func statement(for requests: [Request], partition: Int) -> (PreparedStatement, [String?]) {
        let buffers = Set(requests.compactMap { request in request.buffer.map { ExactString($0) } })
        // release_connection concerns only the requester's own holdings and waiters: read those, not every
        // buffer of a connection id that any frontend can name.
        struct Owned: Hashable {
            let connection: ExactString
            let principal: ExactString?
        }
        let owned = Array(Set(requests.compactMap { request -> Owned? in
            guard case .releaseConnection(let connection) = request.command else { return nil }
            return Owned(connection: ExactString(connection), principal: request.principal.map { ExactString($0) })
        }))
        return (sql, [
            String(partition), PostgresArray.text(Set(requests.map { ExactString($0.requestID) }).map(\.string)),
            PostgresArray.text(buffers.map(\.string)), PostgresArray.text(owned.map { $0.connection.string }), PostgresArray.text(owned.map { $0.principal?.string }),
        ])
    }
}
