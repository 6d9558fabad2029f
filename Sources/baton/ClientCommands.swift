import ArgumentParser
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

    /// Sends `command`, prints the reply, and exits 0 (success), 1 (denied / not owner) or 2 (error).
    func send(_ command: Command) async throws {
        let client = try client(command.operation == .forceRelease ? .operator : .frontend)
        let request = Request(requestID: requestID ?? UUID().uuidString, command: command)
        do {
            let reply: Reply
            if case .releaseConnection(let connection) = command {
                let released = try await client.releaseConnection(connection, requestID: request.requestID)
                reply = Reply(requestID: request.requestID, status: .releasedConnection, buffers: released.buffers, releasedCount: released.count)
            } else {
                reply = try await client.call(request)
            }
            await client.close()
            print(json ? String(decoding: ProtocolCodec.encode(reply), as: UTF8.self) : reply.summary)
            switch reply.status {
            case .denied, .notOwner: throw ExitCode(1)
            default: return
            }
        } catch let error as BatonClientError {
            await client.close()
            if json {
                let reply = Reply(requestID: request.requestID, status: .error, error: ReplyError(code: error.errorCode ?? .invalidRequest, message: error.message))
                print(String(decoding: ProtocolCodec.encode(reply), as: UTF8.self))
            } else {
                FileHandle.standardError.write(Data("error: \(error.message)\n".utf8))
            }
            throw ExitCode(2)
        }
    }
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

    func run() async throws {
        try await options.send(.claim(buffer: buffer, holder: Holder(user: user, connection: connection), leaseMilliseconds: lease.milliseconds))
    }
}

struct Renew: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Extend a lease you hold. Exit 0 renewed, 1 not owner, 2 error.")
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

struct Inspect: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Show who holds a buffer. Exit 0, or 2 on error.")
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
        discussion: "The release is serialized through the buffer's partition queue like every decision, and its event is marked forced."
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
        abstract: "Release every buffer an editor connection holds (sent to all N partitions)."
    )
    @OptionGroup var options: ClientOptions
    @Argument(help: "The editor connection.") var connection: String

    func run() async throws {
        try await options.send(.releaseConnection(connection: connection))
    }
}
