import BatonCommandLine
import ArgumentParser
import BatonPostgres
import Foundation

struct Prune: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Delete idempotency records and delivered events older than a retention (run it from cron).",
        discussion: "A retry must find its original reply: the retention is at least 10 minutes. Undelivered events are never deleted."
    )

    @OptionGroup var database: DatabaseOptions

    @Option(name: .customLong("retention-minutes"), help: "Keep records younger than this, 10-525600 (default 1440, one day).")
    var retentionMinutes = 1440

    func validate() throws {
        guard (10...525_600).contains(retentionMinutes) else {
            throw ValidationError("--retention-minutes \(retentionMinutes) is not allowed: use 10 to 525600")
        }
    }

    func run() async throws {
        let logger = try database.logger("baton.prune")
        let partitioner = try database.partitioner()
        let (requests, outbox) = try await database.withConnection(logger, application: "baton prune") { connection in
            try await OwnershipStore.open(connection: connection, partitioner: partitioner, logger: logger).prune(retention: .seconds(retentionMinutes * 60))
        }
        print("pruned \(requests) idempotency records and \(outbox) delivered events older than \(retentionMinutes) minutes")
    }
}
