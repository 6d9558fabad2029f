// A collab server's ownership, reduced to its core, with the Swift client (the Python twin is
// examples/python/collab_server.py).
//
// Two servers edit one shared buffer. Each writes through `FencedStore`, the resource side of fencing:
// it remembers the highest token it has seen per buffer and refuses a write that carries a lower one.
// Server A claims the buffer with a short lease and then stalls (a long GC pause, a stopped VM) without
// renewing; its lease runs out, server B's waiting claim is granted with a higher token and B writes;
// when A wakes up and writes with its old token, the store refuses it.
//
//     swift run collab-server-example AMQP_URL [PARTITIONS]
//
// Exits 0 when A's stale write was refused and B's stands.

import BatonAMQP
import BatonClient
import BatonCore
import Foundation
import Synchronization

struct StaleToken: Error, CustomStringConvertible {
    let description: String
}

/// Where the collaborators' edits land (a database row, a CRDT document's storage, a file).
final class FencedStore: Sendable {
    private let state = Mutex<(highest: [String: Int64], contents: [String: String])>(([:], [:]))

    func write(_ buffer: String, token: Int64, _ text: String) throws(StaleToken) {
        let refused: Int64? = state.withLock { state in
            let seen = state.highest[buffer] ?? 0
            guard token >= seen else { return seen }
            state.highest[buffer] = token
            state.contents[buffer] = text
            return nil
        }
        if let seen = refused { throw StaleToken(description: "token \(token) is older than \(seen): this writer no longer owns '\(buffer)'") }
    }

    func contents(_ buffer: String) -> String? { state.withLock { $0.contents[buffer] } }
}

func run(url: AMQPURL, partitions: Int) async throws -> Int32 {
    var configuration = BatonClientConfiguration(amqpURL: url, partitioner: try Partitioner(count: partitions))
    configuration.timeout = .seconds(10)
    let a = BatonClient(configuration: configuration)
    let b = BatonClient(configuration: configuration)
    defer { Task { await a.close(); await b.close() } }
    let store = FencedStore()
    let buffer = "examples/\(UUID().uuidString.prefix(8))/main.swift"

    guard case .granted(let first) = try await a.claim(buffer, user: "ann", connection: "server-a", lease: .milliseconds(1500)) else {
        print("A was not granted \(buffer)")
        return 1
    }
    try store.write(buffer, token: first.token, "ann's first edit")
    print("A holds \(buffer) with token \(first.token) and writes")

    // B wants the buffer too and waits in its line instead of polling.
    let waiting = Task { try await b.claim(buffer, user: "bob", connection: "server-b", lease: .seconds(30), wait: .seconds(10)) }
    print("A stalls and does not renew ...")
    try await Task.sleep(for: .milliseconds(2500))  // past A's 1.5 s lease: the worker hands the buffer to B
    guard case .granted(let second) = try await waiting.value else {
        print("B was not granted \(buffer)")
        return 1
    }
    try store.write(buffer, token: second.token, "bob's edit")
    print("B was granted \(buffer) with token \(second.token) and writes")

    do {
        try store.write(buffer, token: first.token, "ann's stale edit")
        print("A's stale write was accepted: the store does not check tokens")
        return 1
    } catch {
        print("A wakes up and writes with token \(first.token): refused (\(error))")
    }
    print("the buffer holds: '\(store.contents(buffer) ?? "")'")
    _ = try await b.release(buffer, connection: "server-b", token: second.token)
    return store.contents(buffer) == "bob's edit" ? 0 : 1
}

let arguments = CommandLine.arguments
guard arguments.count >= 2, let url = try? AMQPURL(arguments[1]) else {
    FileHandle.standardError.write(Data("usage: collab-server-example AMQP_URL [PARTITIONS]\n".utf8))
    exit(64)
}
let partitions = arguments.count > 2 ? Int(arguments[2]) ?? 16 : 16
do {
    exit(try await run(url: url, partitions: partitions))
} catch {
    FileHandle.standardError.write(Data("error: \(error)\n".utf8))
    exit(1)
}
