import BatonCommandLine
import BatonOperations
import ArgumentParser
import BatonAMQP
import BatonClient
import BatonCore
import Foundation

/// Options of the commands that send one request.
struct ClientOptions: ParsableArguments {
    @OptionGroup var database: DatabaseOptions
    @OptionGroup var broker: BrokerOptions

    @Flag(help: "Print the reply as JSON (the protocol's reply body).")
    var json = false

    @Option(name: .customLong("timeout-ms"), help: "How long to wait for the reply, retries included, 100-600000 (default 5000).")
    var timeoutMilliseconds = 5000

    @Option(name: .customLong("request-id"), help: "The request id (default: a new UUID). Reuse one to retry safely.")
    var requestID: String?

    func validate() throws {
        guard (100...600_000).contains(timeoutMilliseconds) else {
            throw ValidationError("--timeout-ms \(timeoutMilliseconds) is not allowed: use 100 to 600000")
        }
    }

    func client(_ role: BrokerRole = .frontend) throws -> BatonClient {
        let nodes = try broker.amqpURLs(role)
        var configuration = BatonClientConfiguration(amqpURL: nodes[0], partitioner: try database.partitioner())
        configuration.amqpAlternates = Array(nodes.dropFirst())
        configuration.timeout = .milliseconds(timeoutMilliseconds)
        configuration.name = "baton cli"
        return BatonClient(configuration: configuration, logger: try database.logger("baton.client"))
    }

    /// Sends `command`, prints the reply, and exits with ``ClientExit``: 0 on success, 1 when denied or
    /// not the owner (for force-release: nobody held the buffer), 2 on any error.
    ///
    /// A failed call prints `error: <code>: <message>` on standard error, or with `--json` a reply-shaped
    /// object on standard output (``CallFailure/reply(to:partition:)``), so a script reads one JSON object either way.
    ///
    /// With `waiting`, a claim waits in line for up to that long (protocol section 19) and the call's
    /// timeout is the wait plus `--timeout-ms`.
    func send(_ command: Command, partition: Int? = nil, waiting: Duration? = nil) async throws {
        let client = try client(command.operation == .forceRelease ? .operator : .frontend)
        let request = Request(requestID: requestID ?? UUID().uuidString, command: command).inNFC()
        let reply: Reply
        do {
            reply = try await client.reply(to: request, partition: partition, waiting: waiting)
        } catch {
            // Every failure exits 2, whatever threw it: exit 1 means denied, never "did not work".
            await client.close()
            let failure = CallFailure(error)
            if json {
                let partition = request.buffer.flatMap { buffer in try? database.partitioner().partition(of: buffer) }
                print(failure.reply(to: request, partition: partition))
            } else {
                FileHandle.standardError.write(Data("error: \(failure.code): \(failure.message)\n".utf8))
            }
            throw ClientExit.error.code
        }
        await client.close()
        print(json ? String(decoding: ProtocolCodec.encode(reply), as: UTF8.self) : reply.summary)
        switch reply.status {
        case .denied, .notOwner, .notMember: throw ClientExit.refused.code
        default: return
        }
    }
}

/// The exit statuses of the commands that send one request (README, "Exit codes"). A usage error (an
/// unknown flag, a value out of range, a setting that does not parse) exits 64 before anything is sent,
/// as argument-parser does for every command.
enum ClientExit: Int32 {
    /// Granted, renewed, released, state, released_connection.
    case success = 0
    /// Denied or not_owner: the request was decided, against you.
    case refused = 1
    /// Rejected by the worker, no reply in time, the broker unreachable or refusing: nothing was decided,
    /// or the outcome is unknown (retry with the same `--request-id`).
    case error = 2

    var code: ExitCode { ExitCode(rawValue) }
}

/// `--lease-ms` of claim and renew.
struct LeaseOption: ParsableArguments {
    @Option(name: .customLong("lease-ms"), help: "Lease length from now, 1000-3600000 ms.") var lease = 30_000

    var milliseconds: Int64 { Int64(lease) }

    func validate() throws {
        guard ProtocolV1.leaseRange.contains(Int64(lease)) else {
            throw ValidationError("--lease-ms \(lease) is not allowed: use \(ProtocolV1.leaseRange.lowerBound) to \(ProtocolV1.leaseRange.upperBound)")
        }
    }
}

struct Claim: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Claim a buffer. Exit 0 granted, 1 denied, 2 error.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The buffer.") var buffer: String
    @Option(help: "The user claiming.") var user: String
    @Option(help: "The editor connection claiming (unique per live connection).") var connection: String
    @OptionGroup var lease: LeaseOption
    @Option(
        name: .customLong("wait-ms"),
        help: "Wait in line up to this long while another connection holds the buffer, 1-300000 ms (protocol section 19): granted in turn when it is released or expires, denied when the wait ends. The reply may take that long plus --timeout-ms."
    )
    var waitMilliseconds: Int?

    func validate() throws {
        if let wait = waitMilliseconds, !ProtocolV1.waitRange.contains(Int64(wait)) {
            throw ValidationError("--wait-ms \(wait) is not allowed: use \(ProtocolV1.waitRange.lowerBound) to \(ProtocolV1.waitRange.upperBound)")
        }
    }

    func run() async throws {
        try await options.send(
            .claim(buffer: buffer, holder: Holder(user: user, connection: connection), leaseMilliseconds: lease.milliseconds),
            waiting: waitMilliseconds.map { .milliseconds($0) }
        )
    }
}

struct Renew: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Extend a lease you hold, or a membership (its token). Exit 0 renewed, 1 not owner, 2 error.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The buffer.") var buffer: String
    @Option(help: "Your editor connection.") var connection: String
    @Option(help: "Your token.") var token: Int64
    @OptionGroup var lease: LeaseOption

    func run() async throws {
        try await options.send(.renew(buffer: buffer, connection: connection, token: token, leaseMilliseconds: lease.milliseconds))
    }
}

struct Release: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Release a lease you hold. Exit 0 released, 1 not owner, 2 error.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The buffer.") var buffer: String
    @Option(help: "Your editor connection.") var connection: String
    @Option(help: "Your token.") var token: Int64

    func run() async throws {
        try await options.send(.release(buffer: buffer, connection: connection, token: token))
    }
}

struct Join: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Join a buffer's collaborators: get a replica id, unique among its live members. Exit 0 joined, 2 error.",
        discussion: "A join by a connection that is already a member extends it (same id and token). Renew with `baton renew --token`, end it with `baton leave`; one that expires or whose connection is released keeps its id for the same user for the deployment's grace."
    )
    @OptionGroup var options: ClientOptions
    @Argument(help: "The buffer.") var buffer: String
    @Option(help: "The user joining.") var user: String
    @Option(help: "The editor connection joining (unique per live connection).") var connection: String
    @OptionGroup var lease: LeaseOption

    func run() async throws {
        try await options.send(.join(buffer: buffer, user: user, connection: connection, leaseMilliseconds: lease.milliseconds))
    }
}

struct Leave: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "End your membership of a buffer's collaborators at once, freeing its replica id. Exit 0 left, 1 not a member, 2 error.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The buffer.") var buffer: String
    @Option(help: "Your editor connection.") var connection: String
    @Option(help: "Your membership's token.") var token: Int64

    func run() async throws {
        try await options.send(.leave(buffer: buffer, connection: connection, token: token))
    }
}

struct Inspect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show who holds a buffer and its collaborators. Exit 0, or 2 on error.")
    @OptionGroup var options: ClientOptions
    @Argument(help: "The buffer.") var buffer: String

    func run() async throws {
        try await options.send(.inspect(buffer: buffer))
    }
}

struct ForceRelease: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "force-release",
        abstract: "Release a buffer whoever holds it (operators only: published to baton.admin; see docs/operations.md).",
        discussion: "The release is serialized through the buffer's partition queue like every decision, and its event is marked forced. Exit 0 released, 1 nobody held it, 2 error."
    )
    @OptionGroup var options: ClientOptions
    @Argument(help: "The buffer.") var buffer: String
    @Option(help: "Why, for the worker's log (1-256 characters).") var reason: String?

    func run() async throws {
        try await options.send(.forceRelease(buffer: buffer, reason: reason))
    }
}

struct ReleaseConnection: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "release-connection",
        abstract: "Release every buffer an editor connection holds (sent to all N partitions). Exit 0, or 2 on error."
    )
    @OptionGroup var options: ClientOptions
    @Argument(help: "The editor connection.") var connection: String

    func run() async throws {
        try await options.send(.releaseConnection(connection: connection))
    }
}

struct Describe: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show what the deployment is: N, the protocol revision and the ops its workers accept. Exit 0, or 2 on error.",
        discussion: "Sent to partition 0, which every deployment has (docs/protocol.md, section 17)."
    )
    @OptionGroup var options: ClientOptions

    func run() async throws {
        try await options.send(.describe, partition: 0)
    }
}

struct Events: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Read a partition's ownership changes after a position, in commit order. Exit 0, or 2 on error.",
        discussion: """
            Without --after, prints only the partition's current position. Read on with --after set to the printed \
            position while it says "more" (docs/protocol.md, section 18).
            """
    )
    @OptionGroup var options: ClientOptions
    @Argument(help: "The partition (default: the partition of --buffer).") var partition: Int?
    @Option(help: "Only this buffer's changes (it must belong to the partition).") var buffer: String?
    @Option(help: "Read the changes after this position (a change's seq, or a printed position).") var after: Int64?
    @Option(help: "At most this many changes, 1-256.") var limit = ProtocolV1.maxEventsPerRead

    func validate() throws {
        guard partition != nil || buffer != nil else { throw ValidationError("name a partition, or a buffer with --buffer") }
        guard (1...ProtocolV1.maxEventsPerRead).contains(limit) else { throw ValidationError("--limit \(limit) is not allowed: use 1 to \(ProtocolV1.maxEventsPerRead)") }
        if let after, after < 0 { throw ValidationError("--after \(after) is not allowed: positions are 0 or more") }
        let count = try options.database.partitioner().count
        if let partition, !(0..<count).contains(partition) {
            throw ValidationError("partition \(partition) does not exist: use 0 to \(count - 1) (N = \(count), --partition-count)")
        }
    }

    func run() async throws {
        let target = try partition ?? options.database.partitioner().partition(of: UnicodeForm.nfc(buffer ?? ""))
        try await options.send(.events(buffer: buffer, after: after, limit: limit), partition: target)
    }
}

struct Watch: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Follow ownership changes in commit order, without gaps across reconnects, until interrupted.",
        discussion: """
            Watches one buffer, one partition (--partition) or everything (--all). Prints one line per change (with \
            --json, the event object, which carries partition and seq); save the last seq per partition and pass it \
            with --from to resume. Exit 0 when interrupted, 2 on error.
            """
    )
    @OptionGroup var options: ClientOptions
    @Argument(help: "The buffer to watch.") var buffer: String?
    @Option(help: "Watch every change of this partition.") var partition: Int?
    @Flag(help: "Watch every change of every partition.") var all = false
    @Option(name: .customLong("from"), help: ArgumentHelp("Resume after position SEQ of partition P (repeatable); without it, from now.", valueName: "P:SEQ"))
    var positions: [String] = []

    func scope() throws -> WatchScope {
        switch (buffer, partition, all) {
        case (let buffer?, nil, false): return .buffer(buffer)
        case (nil, let partition?, false): return .partition(partition)
        case (nil, nil, true): return .all
        default: throw ValidationError("watch one of: a buffer, --partition P, or --all")
        }
    }

    func resumePositions() throws -> [Int: Int64] {
        try WatchScope.positions(parsing: positions).mapError { ValidationError("--from \($0)") }.get()
    }

    func validate() throws {
        _ = try scope()
        _ = try resumePositions()
        let count = try options.database.partitioner().count
        if let partition, !(0..<count).contains(partition) {
            throw ValidationError("--partition \(partition) does not exist: use 0 to \(count - 1) (N = \(count), --partition-count)")
        }
    }

    func run() async throws {
        let client = try options.client()
        // Interrupted (ctrl-C) or terminated: what was printed is out, and the watch ends well (exit 0).
        let stops = ProcessSignals.exitOnInterrupt()
        defer { stops.cancel() }
        do {
            for try await event in client.watch(try scope(), from: try resumePositions()) {
                defer { fflush(nil) }
                switch event {
                case .change(let change):
                    print(options.json ? String(decoding: ProtocolCodec.encodeEvent(change), as: UTF8.self) : Reply.line(change))
                case .missed(let partition):
                    print(options.json ? #"{"v":1,"missed":true,"partition":\#(partition)}"# : "missed changes of partition \(partition): they were pruned; re-read the state with inspect")
                }
            }
        } catch {
            await client.close()
            FileHandle.standardError.write(Data("error: \(CallFailure(error).code): \(CallFailure(error).message)\n".utf8))
            throw ClientExit.error.code
        }
        await client.close()
    }
}
