import ArgumentParser
import BatonCore
import BatonOperations
import BatonPostgres
import BatonAMQP
import Foundation
import BatonCommandLine
import Logging

@main
enum BatonMain {
    static func main() async {
        LabCommands.runIfNamed()
        await Baton.main()
    }
}

struct Baton: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "baton",
        abstract: "Race-free ownership of shared editor buffers, decided per partition and fenced in PostgreSQL.",
        discussion: """
            Exit codes: 0 success; 1 denied, not the owner or not a member (claim, renew, release, leave, force-release), or a failure of \
            any other command; 2 an error of a request command (rejected, timed out, broker unreachable; with --json \
            a reply-shaped error on standard output); 64 a usage error.

            The lab's commands run baton-lab, built beside baton (not part of a deployment's image): bench, chaos, demo and \
            bench-store (`baton bench --help`).
            """,
        version: BatonVersion.description,
        subcommands: [
            WorkerCommand.self, Migrate.self, Topology.self, Claim.self, Renew.self, Release.self, Join.self, Leave.self, Inspect.self,
            ReleaseConnection.self, ForceRelease.self, Describe.self, Events.self, Watch.self, Status.self, Prune.self, LogSample.self,
        ]
    )
}

struct Migrate: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Create or upgrade Baton's tables; the first run records the partition count N."
    )

    @OptionGroup var database: DatabaseOptions

    func run() async throws {
        let logger = try database.logger("baton.migrate")
        let partitioner = try database.partitioner()
        let applied = try await database.withConnection(logger, application: "baton migrate") { connection in
            try await Migrator.migrate(connection, partitionCount: partitioner.count, logger: logger)
        }
        let url = try database.databaseURL()
        if applied.isEmpty {
            print("schema is current (version \(Migrator.latestVersion), \(partitioner.count) partitions) at \(url)")
        } else {
            print("applied migrations \(applied.map(String.init).joined(separator: ", ")) (\(partitioner.count) partitions) at \(url)")
        }
    }
}

