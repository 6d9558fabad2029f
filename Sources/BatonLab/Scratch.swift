import BatonAMQP
import BatonCore
import BatonPostgres
import BatonWorker
import Logging

/// A deployment made from nothing for scratch work (bench, chaos, tests): a database of its own,
/// migrated, and the topology declared in a virtual host of its own (``ScratchBroker``).
public enum ScratchDeployment {
    /// Drops `scratch` if it exists (with its connections), creates it on `server` and migrates it for
    /// `partitionCount` partitions. The server's user must be allowed to create databases.
    public static func resetDatabase(_ scratch: PostgresURL, server: PostgresURL, partitionCount: Int, logger: Logger) async throws {
        let name = scratch.database
        try await PostgresConnection.withConnection(to: server, logger: logger) { admin in
            do {
                _ = try await admin.withSession { session in
                    try session.query("DROP DATABASE IF EXISTS \(quoted(name)) WITH (FORCE)")
                    try session.query("CREATE DATABASE \(quoted(name))")
                }
            } catch {
                throw ScratchError("cannot create the scratch database '\(name)' on \(server): \(error); use a --database-url whose user may create databases")
            }
        }
        // With a standby listed first in a multi-host URL, libpq may reach it before it has replayed the
        // CREATE DATABASE, and a missing database ends libpq's walk through the hosts: retry for a while.
        let deadline = ContinuousClock.now + .seconds(15)
        while true {
            do {
                _ = try await PostgresConnection.withConnection(to: scratch, logger: logger) { connection in
                    try await Migrator.migrate(connection, partitionCount: partitionCount, logger: logger)
                }
                return
            } catch let error as PostgresError where !scratch.alternates.isEmpty && ContinuousClock.now < deadline {
                logger.debug("the scratch database is not reachable yet", metadata: ["baton.error": "\(error)"])
                try await Task.sleep(for: .milliseconds(200))
            }
        }
    }

    /// Drops `scratch` (with its connections) on `server`.
    public static func dropDatabase(_ scratch: PostgresURL, server: PostgresURL, logger: Logger) async throws {
        try await PostgresConnection.withConnection(to: server, logger: logger) { admin in
            _ = try await admin.withSession { session in try session.query("DROP DATABASE IF EXISTS \(quoted(scratch.database)) WITH (FORCE)") }
        }
    }

    /// Declares Baton's topology for `partitionCount` partitions through `amqpURL` (a scratch virtual host).
    public static func declareTopology(on amqpURL: AMQPURL, partitionCount: Int, deadLetterLimit: Int = Topology.defaultDeadLetterLimit, logger: Logger) async throws {
        try await AMQPConnection.withConnection(to: amqpURL, name: "baton scratch topology", logger: logger) { connection in
            try await Topology.declare(on: connection, partitionCount: partitionCount, deadLetterLimit: deadLetterLimit)
        }
    }

    /// Both: a fresh migrated database and the topology.
    public static func reset(database scratch: PostgresURL, server: PostgresURL, amqpURL: AMQPURL, partitionCount: Int, logger: Logger) async throws {
        try await resetDatabase(scratch, server: server, partitionCount: partitionCount, logger: logger)
        try await declareTopology(on: amqpURL, partitionCount: partitionCount, logger: logger)
    }
}

/// `name` as an SQL identifier, quoted.
func quoted(_ name: String) -> String {
    "\"" + name.replacingOccurrences(of: "\"", with: "\"\"") + "\""
}

/// A scratch run cannot go on: why, for a person.
public struct ScratchError: Error, Sendable, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}
