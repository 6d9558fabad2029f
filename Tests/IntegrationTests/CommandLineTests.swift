import BatonCore
import BatonPostgres
import Foundation
import Testing

/// The `baton` executable as a user and a script meet it: exit codes, `--json` error replies, usage
/// errors, and `--log-format json`. Each test runs the binary built next to the test bundle.
@Suite(.timeLimit(.minutes(1))) struct CommandLineTests {
    /// What a finished `baton` run left.
    struct Run: CustomStringConvertible {
        let status: Int32
        let standardOutput: String
        let standardError: String

        var description: String { "exit \(status)\n--- stdout:\n\(standardOutput)\n--- stderr:\n\(standardError)" }

        /// Standard error's lines, each parsed as a JSON object (nil for a line that is not one).
        var logLines: [[String: Any]?] {
            standardError.split(separator: "\n").map { line in
                (try? JSONSerialization.jsonObject(with: Data(line.utf8))) as? [String: Any]
            }
        }
    }

    /// Runs `baton arguments` to its end with this process's environment (without `BATON_LOG_*`) plus
    /// `environment`; standard output and error are kept apart. Kills it after `timeout`.
    /// With `interruptAfter`, it is interrupted (SIGINT, as ctrl-C) then instead, and its run returned.
    static func baton(
        _ arguments: [String], environment extra: [String: String] = [:], timeout: Duration = .seconds(20), interruptAfter: Duration? = nil,
        executable: URL = Deployment.batonExecutable
    ) async throws -> Run {
        let folder = FileManager.default.temporaryDirectory
        let name = "baton-cli-\(getpid())-\(UInt64.random(in: 0...UInt64.max))"
        let outputFile = folder.appendingPathComponent("\(name).out")
        let errorFile = folder.appendingPathComponent("\(name).err")
        defer {
            try? FileManager.default.removeItem(at: outputFile)
            try? FileManager.default.removeItem(at: errorFile)
        }
        _ = FileManager.default.createFile(atPath: outputFile.path, contents: nil)
        _ = FileManager.default.createFile(atPath: errorFile.path, contents: nil)
        var environment = ProcessInfo.processInfo.environment
        environment["BATON_LOG_FORMAT"] = nil
        environment["BATON_LOG_LEVEL"] = nil
        environment.merge(extra) { $1 }
        let process = Process()
        process.executableURL = executable
        process.arguments = arguments
        process.environment = environment
        process.standardInput = FileHandle.nullDevice
        let output = try FileHandle(forWritingTo: outputFile)
        let error = try FileHandle(forWritingTo: errorFile)
        defer {
            try? output.close()
            try? error.close()
        }
        process.standardOutput = output
        process.standardError = error
        try process.run()
        let deadline = ContinuousClock.now + (interruptAfter ?? timeout)
        while process.isRunning, ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
        }
        if process.isRunning, interruptAfter != nil {
            process.interrupt()
            while process.isRunning { try await Task.sleep(for: .milliseconds(10)) }
        }
        if process.isRunning {
            process.terminate()
            throw TestFailure("baton \(arguments.joined(separator: " ")) did not end within \(timeout)")
        }
        return Run(
            status: process.terminationStatus,
            standardOutput: try String(contentsOf: outputFile, encoding: .utf8),
            standardError: try String(contentsOf: errorFile, encoding: .utf8)
        )
    }

    /// The fields of a protocol error reply, as the worker's codec writes them.
    static let errorReplyFields: Set<String> = {
        let reply = Reply(requestID: "r", status: .error, buffer: "b", partition: 0, error: ReplyError(code: .invalidRequest, message: "m"))
        let object = (try? JSONSerialization.jsonObject(with: Data(ProtocolCodec.encode(reply)))) as? [String: Any]
        return Set(object?.keys.map { $0 } ?? [])
    }()

    /// Checks that `line` is a JSON log entry as README describes it; returns it.
    @discardableResult
    static func expectLogEntry(_ line: [String: Any]?, _ run: Run, sourceLocation: SourceLocation = #_sourceLocation) -> [String: Any] {
        guard let line else {
            Issue.record("a log line is not a JSON object:\n\(run)", sourceLocation: sourceLocation)
            return [:]
        }
        #expect(Set(line.keys) == ["ts", "level", "label", "message", "source", "metadata"], "\(line)", sourceLocation: sourceLocation)
        let ts = line["ts"] as? String ?? ""
        #expect(Timestamp(rfc3339: ts) != nil, "ts '\(ts)' is not ISO 8601 UTC with milliseconds", sourceLocation: sourceLocation)
        #expect(["trace", "debug", "info", "notice", "warning", "error", "critical"].contains(line["level"] as? String ?? ""), sourceLocation: sourceLocation)
        #expect(line["label"] is String && line["message"] is String && line["source"] is String, sourceLocation: sourceLocation)
        let metadata = line["metadata"] as? [String: Any]
        #expect(metadata != nil && metadata?.values.allSatisfy { $0 is String } == true, "metadata values are strings: \(line)", sourceLocation: sourceLocation)
        return line
    }

    // MARK: - Version

    /// `baton --version`: the release, the git commit the binary was built from (this checkout's, so not
    /// `unknown`) and the build date.
    @Test func versionNamesTheReleaseTheCommitAndTheBuildDate() async throws {
        let version = try await Self.baton(["--version"])
        #expect(version.status == 0, "\(version)")
        let line = version.standardOutput.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(line.hasPrefix("baton 0."), "\(line)")
        let commit = try #require(line.firstRange(of: "(commit ").map { line[$0.upperBound...].prefix { $0 != "," } })
        #expect(commit.count >= 12 && commit.prefix(12).allSatisfy(\.isHexDigit), "a git commit, not \(commit)")
        #expect(line.range(of: #"built \d{4}-\d{2}-\d{2}\)$"#, options: .regularExpression) != nil, "\(line)")
    }

    // MARK: - The lab

    /// `baton bench` and the other lab commands run the `baton-lab` beside `baton` (its help, its usage
    /// errors and exit codes); a `baton` alone (a deployment's image) says what is missing and exits 1.
    @Test func labCommandsRunTheLabBesideBatonOrSayItIsMissing() async throws {
        let help = try await Self.baton(["bench", "--help"])
        #expect(help.status == 0 && help.standardOutput.contains("USAGE: baton-lab bench"), "\(help)")
        let usage = try await Self.baton(["demo", "--rounds", "0"])
        #expect(usage.status == 64 && usage.standardError.contains("--rounds 0 is not allowed"), "\(usage)")
        let listed = try await Self.baton(["--help"])
        #expect(listed.standardOutput.contains("The lab's commands run baton-lab"), "\(listed)")

        let folder = FileManager.default.temporaryDirectory.appendingPathComponent("baton-alone-\(getpid())-\(UInt64.random(in: 0...UInt64.max))")
        try FileManager.default.createDirectory(at: folder, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: folder) }
        let alone = folder.appendingPathComponent("baton")
        try FileManager.default.copyItem(at: Deployment.batonExecutable, to: alone)
        let missing = try await Self.baton(["chaos", "--settle-seconds", "1"], executable: alone)
        #expect(missing.status == 1, "\(missing)")
        #expect(missing.standardError.contains("`baton chaos` is a lab command") && missing.standardError.contains(folder.appendingPathComponent("baton-lab").path), "\(missing)")
        let version = try await Self.baton(["--version"], executable: alone)
        #expect(version.status == 0 && version.standardOutput.hasPrefix("baton 0."), "the other commands need no lab: \(version)")
    }

    // MARK: - Examples

    /// examples/swift: two servers and a store that checks fencing tokens; the stalled server's write
    /// with its old token is refused once the other was granted the buffer.
    @Test func theCollabServerExampleRefusesAStaleWrite() async throws {
        let deployment = try await Deployment.make(partitions: 4)
        let worker = deployment.startWorker()
        let example = Deployment.batonExecutable.deletingLastPathComponent().appendingPathComponent("collab-server-example")
        let run = try await Self.baton([deployment.frontendURL.connectionString, "4"], timeout: .seconds(40), executable: example)
        await worker.stop()
        #expect(run.status == 0, "\(run)")
        #expect(run.standardOutput.contains("A holds examples/") && run.standardOutput.contains("with token 1"), "\(run)")
        #expect(run.standardOutput.contains("refused (token 1 is older than 2"), "\(run)")
        #expect(run.standardOutput.contains("the buffer holds: 'bob's edit'"), "\(run)")
    }

    /// `baton topology` takes a cluster's node list as the workers do: a node that does not answer is
    /// skipped (the compose cluster profile's one-shot `migrate` runs it).
    @Test func topologyDeclaresThroughTheFirstNodeThatAnswers() async throws {
        let deployment = try await Deployment.make(partitions: 4)
        var dead = deployment.amqpURL
        dead.port = 1
        let run = try await Self.baton(
            ["topology", "--partition-count", "4", "--amqp-url", "\(dead.connectionString),\(deployment.amqpURL.connectionString)"],
            environment: deployment.environment()
        )
        #expect(run.status == 0, "\(run)")
        #expect(run.standardOutput.contains("partition queues on amqp://") && run.standardOutput.contains(":\(deployment.amqpURL.port)/"), "\(run)")
        #expect(!run.standardOutput.contains(":1/"), "\(run)")
    }

    /// `baton status` reads the queues through the first node of the list that answers, as workers do
    /// (it used the first URL only), and says which node that was (its password redacted).
    @Test func statusReadsTheQueuesThroughTheFirstNodeThatAnswers() async throws {
        let deployment = try await Deployment.make(partitions: 4)
        var dead = deployment.amqpURL
        dead.port = 1
        let run = try await Self.baton(
            ["status", "--json", "--partition-count", "4", "--amqp-url", "\(dead.connectionString),\(deployment.amqpURL.connectionString)"],
            environment: deployment.environment()
        )
        #expect(run.status == 0, "\(run)")
        let output = try JSONSerialization.jsonObject(with: Data(run.standardOutput.utf8)) as? [String: Any]
        let rows = output?["partitions"] as? [[String: Any]] ?? []
        #expect(rows.count == 4, "\(run)")
        #expect(rows.allSatisfy { $0["consumers"] is Int && $0["messages_ready"] is Int }, "the queue columns were read: \(run)")
        #expect(output?["broker_error"] == nil, "\(run)")
        let broker = output?["broker"] as? String ?? ""
        #expect(broker.contains(":\(deployment.amqpURL.port)/") && !broker.contains(":1/"), "\(run)")
        #expect(broker.contains(":********@"), "the node's password is redacted: \(broker)")
    }

    /// `baton demo` connects its two clients to the first node of the list that answers (it used the
    /// first URL only) and races through a running worker with no double grant.
    @Test func demoRacesThroughTheFirstNodeThatAnswers() async throws {
        let deployment = try await Deployment.make(partitions: 4)
        let worker = deployment.startWorker()
        var dead = deployment.frontendURL
        dead.port = 1
        let run = try await Self.baton(
            ["demo", "--rounds", "20", "--partition-count", "4", "--timeout-ms", "15000", "--amqp-url", "\(dead.connectionString),\(deployment.frontendURL.connectionString)"],
            environment: deployment.environment(), timeout: .seconds(40)
        )
        await worker.stop()
        #expect(run.status == 0, "\(run)")
        #expect(run.standardOutput.contains("grants:        20 (expected 20") && run.standardOutput.contains("double grants: 0"), "\(run)")
    }

    // MARK: - Usage errors

    @Test func usageErrorsExit64WithTheReasonOnStandardErrorAndNothingOnStandardOutput() async throws {
        let missing = try await Self.baton(["inspect", "--json"])
        #expect(missing.status == 64, "\(missing)")
        #expect(missing.standardOutput.isEmpty, "no JSON for a usage error: \(missing)")
        #expect(missing.standardError.contains("Error: Missing expected argument '<buffer>'"), "\(missing)")
        #expect(missing.standardError.contains("Usage: baton inspect"), "\(missing)")

        let unknown = try await Self.baton(["claim", "b", "--user", "u", "--connection", "c", "--bogus"])
        #expect(unknown.status == 64 && unknown.standardError.contains("Error: Unknown option '--bogus'"), "\(unknown)")

        let range = try await Self.baton(["claim", "b", "--user", "u", "--connection", "c", "--lease-ms", "5"])
        #expect(range.status == 64 && range.standardError.contains("--lease-ms 5 is not allowed: use 1000 to 3600000"), "\(range)")

        let format = try await Self.baton(["inspect", "b", "--log-format", "xml"])
        #expect(format.status == 64 && format.standardError.contains("log format 'xml' is not allowed: use text or json"), "\(format)")

        let variable = try await Self.baton(["inspect", "b"], environment: ["BATON_LOG_FORMAT": "yaml"])
        #expect(variable.status == 64 && variable.standardError.contains("log format 'yaml' is not allowed: use text or json"), "\(variable)")
    }

    // MARK: - Errors under --json

    /// A broker that does not listen: the call times out, exit 2, and `--json` prints a reply-shaped error.
    @Test func anUnreachableBrokerUnderJSONExits2WithAReplyShapedErrorAndNoPassword() async throws {
        let password = "cli-secret-\(UInt32.random(in: 0...UInt32.max))"
        let url = "amqp://baton-cli:\(password)@127.0.0.1:1/%2F"
        let requestID = "cli-\(UUID().uuidString)"
        let run = try await Self.baton([
            "inspect", "project:42/src/main.rs", "--json", "--timeout-ms", "2000", "--amqp-url", url, "--request-id", requestID, "--partition-count", "16",
            "--log-format", "json", "--log-level", "debug",
        ])
        #expect(run.status == 2, "\(run)")
        #expect(!run.standardOutput.contains(password) && !run.standardError.contains(password), "the password leaked:\n\(run)")

        let lines = run.standardOutput.split(separator: "\n")
        #expect(lines.count == 1, "one reply on standard output: \(run)")
        let reply = try #require((try? JSONSerialization.jsonObject(with: Data((lines.first ?? "").utf8))) as? [String: Any], "\(run)")
        #expect(Set(reply.keys) == Self.errorReplyFields, "the fields of a protocol error reply: \(reply.keys.sorted())")
        #expect(reply["v"] as? Int == 1)
        #expect(reply["status"] as? String == "error")
        #expect(reply["request_id"] as? String == requestID)
        #expect(reply["buffer"] as? String == "project:42/src/main.rs")
        #expect(reply["partition"] as? Int == (try Partitioner(count: 16)).partition(of: "project:42/src/main.rs"))
        let error = try #require(reply["error"] as? [String: Any])
        #expect(Set(error.keys) == ["code", "message"])
        #expect(error["code"] as? String == "timeout", "\(error)")
        let message = error["message"] as? String ?? ""
        #expect(message.contains(requestID), "the message names the request id to retry with: \(error)")
        #expect(message.contains("could not be reached") && message.contains("was not sent"), "the message says why, not 'is a worker serving': \(error)")

        // Its debug log says why, as JSON lines, with the URL's password redacted.
        #expect(!run.logLines.isEmpty)
        for line in run.logLines { Self.expectLogEntry(line, run) }
        #expect(run.standardError.contains("baton-cli:********@127.0.0.1:1"), "\(run)")

        // Without --json: nothing on standard output, the code and message on standard error. (2 s, not
        // 300 ms: under the whole suite's load a 300 ms call once timed out before its first connection
        // attempt and said "is a worker serving" instead.)
        let text = try await Self.baton(["inspect", "b", "--timeout-ms", "2000", "--amqp-url", url])
        #expect(text.status == 2 && text.standardOutput.isEmpty, "\(text)")
        #expect(text.standardError.hasPrefix("error: timeout: inspect 'b' (request_id ") && text.standardError.contains("the broker could not be reached"), "\(text)")
        #expect(!text.standardError.contains(password))
    }

    /// force-release connects before it sends: a connection failure is exit 2 (never 1, which means
    /// "nobody held it"), with the transport's code.
    @Test func forceReleaseWithAnUnreachableBrokerExits2() async throws {
        let password = "cli-secret-\(UInt32.random(in: 0...UInt32.max))"
        let run = try await Self.baton(["force-release", "b", "--json", "--timeout-ms", "300", "--amqp-url", "amqp://op:\(password)@127.0.0.1:1/%2F"])
        #expect(run.status == 2, "\(run)")
        #expect(!run.standardOutput.contains(password) && !run.standardError.contains(password), "the password leaked:\n\(run)")
        let reply = try #require((try? JSONSerialization.jsonObject(with: Data(run.standardOutput.utf8))) as? [String: Any], "\(run)")
        #expect(Set(reply.keys) == Self.errorReplyFields)
        #expect((reply["error"] as? [String: Any])?["code"] as? String == "connection_failed", "\(reply)")
    }

    /// Exit 0 granted, 1 denied, 2 rejected; a rejected request under `--json` prints the worker's error.
    @Test func exitCodesAndTheWorkersErrorReplyUnderJSON() async throws {
        let deployment = try await Deployment.make(partitions: 4)
        let environment = deployment.environment()
        let common = ["--partition-count", "4", "--timeout-ms", "10000"]
        let requestID = "cli-\(UUID().uuidString)"
        let worker = deployment.startWorker()
        let granted = try? await Self.baton(["claim", "cli.txt", "--user", "ann", "--connection", "c1", "--request-id", requestID] + common, environment: environment)
        let denied = try? await Self.baton(["claim", "cli.txt", "--user", "bob", "--connection", "c2", "--json"] + common, environment: environment)
        // The same request id for another request: the worker refuses it.
        let reused = try? await Self.baton(["inspect", "cli.txt", "--json", "--request-id", requestID] + common, environment: environment)
        await worker.stop()

        let claim = try #require(granted)
        #expect(claim.status == 0 && claim.standardOutput.hasPrefix("granted 'cli.txt' to ann@c1: token 1"), "\(claim)")
        let refusal = try #require(denied)
        #expect(refusal.status == 1, "\(refusal)")
        let deniedReply = (try? JSONSerialization.jsonObject(with: Data(refusal.standardOutput.utf8))) as? [String: Any]
        #expect(deniedReply?["status"] as? String == "denied", "\(refusal)")

        let rejected = try #require(reused)
        #expect(rejected.status == 2, "\(rejected)")
        #expect(rejected.standardError.isEmpty, "\(rejected)")
        let reply = try #require((try? JSONSerialization.jsonObject(with: Data(rejected.standardOutput.utf8))) as? [String: Any], "\(rejected)")
        #expect(Set(reply.keys) == Self.errorReplyFields)
        #expect(reply["status"] as? String == "error" && reply["request_id"] as? String == requestID && reply["buffer"] as? String == "cli.txt")
        #expect(reply["partition"] as? Int == deployment.partitioner.partition(of: "cli.txt"))
        #expect((reply["error"] as? [String: Any])?["code"] as? String == ErrorCode.requestIDReused.rawValue, "\(reply)")
    }

    /// `join` and `leave`: a replica id per collaborator, `inspect` lists them, a second leave exits 1.
    @Test func joinInspectAndLeaveFromTheCommandLine() async throws {
        let deployment = try await Deployment.make(partitions: 4)
        let environment = deployment.environment()
        let common = ["--partition-count", "4", "--timeout-ms", "10000"]
        let worker = deployment.startWorker()
        let ann = try await Self.baton(["join", "team.md", "--user", "ann", "--connection", "c1"] + common, environment: environment)
        let bob = try await Self.baton(["join", "team.md", "--user", "bob", "--connection", "c2", "--json"] + common, environment: environment)
        let inspect = try await Self.baton(["inspect", "team.md"] + common, environment: environment)
        let bobReply = (try? JSONSerialization.jsonObject(with: Data(bob.standardOutput.utf8))) as? [String: Any]
        let token = try #require(bobReply?["token"] as? Int, "\(bob)")
        let left = try await Self.baton(["leave", "team.md", "--connection", "c2", "--token", "\(token)"] + common, environment: environment)
        let again = try await Self.baton(["leave", "team.md", "--connection", "c2", "--token", "\(token)"] + common, environment: environment)
        await worker.stop()
        #expect(ann.status == 0 && ann.standardOutput.hasPrefix("joined 'team.md' as replica 1: token 1"), "\(ann)")
        #expect(bobReply?["status"] as? String == "joined" && bobReply?["replica_id"] as? Int == 2 && bobReply?["members"] as? Int == 2, "\(bob)")
        #expect(inspect.status == 0 && inspect.standardOutput.contains("2 member(s): 1 ann@c1, 2 bob@c2"), "\(inspect)")
        #expect(left.status == 0 && left.standardOutput.hasPrefix("left 'team.md': replica 2 is free"), "\(left)")
        #expect(again.status == 1 && again.standardOutput.hasPrefix("not a member of 'team.md'"), "\(again)")
    }

    /// `claim --wait-ms`: the claim waits in line behind the holder and is granted when the holder
    /// releases; out of range, a usage error.
    @Test func aClaimFromTheCommandLineWaitsInLine() async throws {
        let deployment = try await Deployment.make(partitions: 4)
        let environment = deployment.environment()
        let common = ["--partition-count", "4", "--timeout-ms", "10000"]
        let worker = deployment.startWorker()
        let first = try await Self.baton(["claim", "line.txt", "--user", "ann", "--connection", "c1"] + common, environment: environment)
        #expect(first.status == 0 && first.standardOutput.hasPrefix("granted 'line.txt' to ann@c1: token 1"), "\(first)")
        let started = ContinuousClock.now
        let waiting = Task {
            try await Self.baton(["claim", "line.txt", "--user", "bob", "--connection", "c2", "--wait-ms", "20000", "--json"] + common, environment: environment, timeout: .seconds(40))
        }
        try await Task.sleep(for: .seconds(1))
        let release = try await Self.baton(["release", "line.txt", "--connection", "c1", "--token", "1"] + common, environment: environment)
        #expect(release.status == 0, "\(release)")
        let granted = try await waiting.value
        let took = ContinuousClock.now - started
        await worker.stop()
        #expect(granted.status == 0, "\(granted)")
        let reply = try #require((try? JSONSerialization.jsonObject(with: Data(granted.standardOutput.utf8))) as? [String: Any], "\(granted)")
        #expect(reply["status"] as? String == "granted" && reply["token"] as? Int == 2, "\(reply)")
        #expect(took >= .seconds(1) && took < .seconds(15), "granted when ann released, not when the wait ended (\(took))")

        let range = try await Self.baton(["claim", "b", "--user", "u", "--connection", "c", "--wait-ms", "0"])
        #expect(range.status == 64 && range.standardError.contains("--wait-ms 0 is not allowed: use 1 to 300000"), "\(range)")
    }

    @Test func describeEventsAndWatchFromTheCommandLine() async throws {
        let deployment = try await Deployment.make(partitions: 4)
        let environment = deployment.environment()
        let common = ["--partition-count", "4", "--timeout-ms", "10000"]
        let worker = deployment.startWorker()
        let described = try? await Self.baton(["describe", "--json"] + common, environment: environment)
        let buffer = "cli/watched.txt"
        let partition = deployment.partitioner.partition(of: buffer)
        // A watch of the buffer from the position before it is claimed and released (so it sees both
        // however late it starts).
        let client = deployment.client()
        let start = try await client.events(partition: partition, after: nil).position
        let watching = Task {
            try await Self.baton(["watch", buffer, "--json", "--from", "\(partition):\(start)"] + common, environment: environment, interruptAfter: .seconds(6))
        }
        if case .granted(let lease) = try await client.claim(buffer, user: "ann", connection: "c1") {
            _ = try await client.release(buffer, connection: "c1", token: lease.token)
        }
        await client.close()
        let watched = try? await watching.value
        let events = try? await Self.baton(["events", "--buffer", buffer, "--after", "0"] + common, environment: environment)
        let badFrom = try? await Self.baton(["watch", "--all", "--from", "x"] + common, environment: environment)
        await worker.stop()

        let description = try #require(described)
        let object = (try? JSONSerialization.jsonObject(with: Data(description.standardOutput.utf8))) as? [String: Any]
        #expect(description.status == 0 && object?["partitions"] as? Int == 4 && object?["revision"] as? Int == ProtocolV1.revision, "\(description)")

        let watch = try #require(watched)
        let lines = watch.standardOutput.split(separator: "\n").compactMap { (try? JSONSerialization.jsonObject(with: Data($0.utf8))) as? [String: Any] }
        #expect(lines.map { $0["kind"] as? String } == ["granted", "released"], "\(watch)")
        #expect(lines.allSatisfy { $0["partition"] as? Int == partition && ($0["seq"] as? Int ?? 0) > 0 })

        let read = try #require(events)
        #expect(read.status == 0 && read.standardOutput.contains("\(partition):") && read.standardOutput.contains("granted 'cli/watched.txt' ann@c1 token 1"), "\(read)")
        let usage = try #require(badFrom)
        #expect(usage.status == 64 && usage.standardError.contains("--from 'x' is not P:SEQ"), "\(usage)")
    }

    // MARK: - --log-format json

    /// `baton migrate` against a fresh database: the flag, then the environment variable.
    @Test func migrateLogsJSONLines() async throws {
        let url = try await TestDatabase.create()
        let run = try await Self.baton(["migrate", "--database-url", url.connectionString, "--log-format", "json", "--log-level", "debug"])
        #expect(run.status == 0, "\(run)")
        #expect(run.standardOutput.hasPrefix("applied migrations 1"), "\(run)")
        let entries = run.logLines.map { Self.expectLogEntry($0, run) }
        #expect(entries.contains { $0["message"] as? String == "applied migration" && ($0["metadata"] as? [String: String])?["baton.migration"]?.hasPrefix("1 ") == true }, "\(run)")
        #expect(entries.allSatisfy { $0["label"] as? String == "baton.migrate" }, "\(run)")
        // The connection's debug line names the database with its password redacted, as the text format does.
        let connected = try #require(entries.first { $0["message"] as? String == "connected to PostgreSQL" }, "\(run)")
        let named = (connected["metadata"] as? [String: String])?["baton.database"] ?? ""
        #expect(named.contains("********") && named.contains(url.database), "\(connected)")
        if let password = url.password { #expect(!run.standardError.contains("\(url.user):\(password)@"), "the password leaked:\n\(run)") }

        let again = try await Self.baton(
            ["migrate", "--database-url", url.connectionString], environment: ["BATON_LOG_FORMAT": "json", "BATON_LOG_LEVEL": "debug"]
        )
        #expect(again.status == 0 && again.standardOutput.hasPrefix("schema is current"), "\(again)")
        #expect(!again.logLines.isEmpty, "\(again)")
        for line in again.logLines { Self.expectLogEntry(line, again) }
    }

    /// Escaping and flattening, through the hidden `log-sample` command.
    @Test func jsonLogLinesEscapeStringsAndFlattenNestedMetadata() async throws {
        let message = "quote \" backslash \\ newline \n tab \t bell \u{07} escape \u{1B}[31m del \u{7F} é ✓ 😀 \u{2028}"
        let run = try await Self.baton([
            "log-sample", "--log-format", "json", "--message", message, "--metadata", "plain=a \"b\" \\c", "--metadata", "empty=", "--nested",
        ])
        #expect(run.status == 0, "\(run)")
        let raw = run.standardError.split(separator: "\n", omittingEmptySubsequences: false)
        #expect(raw.count == 2 && raw.last == "", "one line, newline-terminated: \(run)")
        let entry = Self.expectLogEntry(run.logLines.first ?? nil, run)
        #expect(entry["message"] as? String == message, "the message round-trips exactly")
        #expect(entry["level"] as? String == "info" && entry["label"] as? String == "baton.log-sample" && entry["source"] as? String == "baton")
        let metadata = entry["metadata"] as? [String: String] ?? [:]
        #expect(metadata == [
            "plain": "a \"b\" \\c", "empty": "",
            "nested.value": "x", "nested.list.0": "a", "nested.list.1": "b", "nested.empty": "[:]",
        ], "\(metadata)")
        // Control characters are escaped; other characters stay UTF-8.
        let line = String(raw.first ?? "")
        #expect(line.contains(#"\u0007"#) && line.contains(#"\u001b[31m"#) && line.contains(#"\u007f"#) && line.contains(#"\n"#) && line.contains(#"\t"#))
        #expect(line.contains("é ✓ 😀") && !line.contains("\u{07}") && !line.contains("\u{1B}"))
        #expect(run.standardOutput.isEmpty, "logs go to standard error only")

        let quiet = try await Self.baton(["log-sample", "--log-format", "json", "--log-level", "warning"])
        #expect(quiet.status == 0 && quiet.standardError.isEmpty, "below the level, nothing: \(quiet)")
    }

    /// The metadata of a text log line (`ts level label: key=value key="quoted value" [source] message`),
    /// read as a log shipper reads logfmt: keys and values up to the `[source]`.
    static func textMetadata(_ line: Substring) -> [String: String] {
        guard let start = line.range(of: ": ")?.upperBound else { return [:] }
        var fields: [String: String] = [:]
        var rest = line[start...]
        while let first = rest.first, first != "[" {
            guard let equals = rest.firstIndex(of: "=") else { break }
            let key = String(rest[..<equals])
            rest = rest[rest.index(after: equals)...]
            var value = ""
            if rest.first == "\"" {
                rest = rest.dropFirst()
                while let character = rest.first, character != "\"" {
                    if character == "\\", let escaped = rest.dropFirst().first {
                        value.append(escaped)
                        rest = rest.dropFirst(2)
                    } else {
                        value.append(character)
                        rest = rest.dropFirst()
                    }
                }
                rest = rest.dropFirst()
            } else {
                let end = rest.firstIndex(of: " ") ?? rest.endIndex
                value = String(rest[..<end])
                rest = rest[end...]
            }
            fields[key] = value
            rest = rest.drop { $0 == " " }
        }
        return fields
    }

    /// Issue 22, finding 13: one value stays one value in the text format, whatever it contains.
    @Test func textLogLinesCannotBeForgedByAValue() async throws {
        let forged = "x baton.principal=baton-operator baton.op=force_release"
        let run = try await Self.baton([
            "log-sample", "--log-format", "text", "--message", "request refused", "--metadata", "baton.request_id=\(forged)",
            "--metadata", "baton.op=claim", "--metadata", "quote=say \"hi\" \\ back", "--metadata", "empty=",
        ])
        #expect(run.status == 0, "\(run)")
        let lines = run.standardError.split(separator: "\n")
        #expect(lines.count == 1, "\(run)")
        let fields = Self.textMetadata(lines.first ?? "")
        // A value reads back as it is shown everywhere in logs: backslashes doubled, control characters escaped.
        #expect(fields == ["baton.request_id": forged, "baton.op": "claim", "quote": LogValue.escape("say \"hi\" \\ back"), "empty": ""], "\(run)")
        #expect(lines.first?.hasSuffix("[baton] request refused") == true, "\(run)")
    }

    /// The worker and the libraries it runs (service lifecycle) log JSON too.
    @Test func theWorkerLogsJSONLines() async throws {
        let deployment = try await Deployment.make(partitions: 2)
        let id = "cli-json-\(UUID().uuidString.prefix(6))"
        let process = try deployment.spawnWorker(id: id, extra: ["--log-format", "json"])
        let log = FileManager.default.temporaryDirectory.appendingPathComponent("baton-test-worker-\(id).log")
        defer { try? FileManager.default.removeItem(at: log) }
        let connected = await Deployment.eventually(.seconds(20)) {
            ((try? String(contentsOf: log, encoding: .utf8)) ?? "").contains("\"worker connected\"")
        }
        await process.stop()
        let text = (try? String(contentsOf: log, encoding: .utf8)) ?? ""
        let run = Run(status: process.reap() ?? -1, standardOutput: "", standardError: text)
        #expect(connected, "\(run)")
        #expect(run.status == 0, "a SIGTERM stops the worker cleanly: \(run)")
        let entries = run.logLines.map { Self.expectLogEntry($0, run) }
        #expect(entries.contains { $0["message"] as? String == "worker stopped" && $0["label"] as? String == "baton.worker" }, "\(run)")
    }

    /// A worker that cannot start says why in a JSON line too (not argument-parser's plain `Error:` line), and exits 1.
    @Test func aWorkerThatFailsUnderJSONLogsTheReasonAsAJSONLine() async throws {
        let url = try await TestDatabase.create()  // not migrated: the worker refuses to start
        let run = try await Self.baton([
            "worker", "--database-url", url.connectionString, "--amqp-url", "amqp://x:y@127.0.0.1:1/%2F", "--metrics-port", "0", "--log-format", "json",
        ])
        #expect(run.status == 1, "\(run)")
        let entries = run.logLines.map { Self.expectLogEntry($0, run) }
        let last = try #require(entries.last, "\(run)")
        #expect(last["level"] as? String == "critical" && last["message"] as? String == "worker failed", "\(run)")
        let reason = (last["metadata"] as? [String: String])?["baton.error"] ?? ""
        #expect(reason.contains("baton migrate"), "\(run)")
    }
}
