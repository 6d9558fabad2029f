import BatonCore
import Foundation
import Synchronization

/// The workloads `baton bench` runs.
public enum Workload: String, CaseIterable, Sendable {
    /// Claims on many cold buffers.
    case openStorm = "open-storm"
    /// Many clients contending for a few buffers: claim, hold about 1 ms, release.
    case hot
    /// Holders renewing their leases.
    case renewHeavy = "renew-heavy"
    /// The incident's shape: hundreds of users per frontend open files in pairs (two users claim the
    /// same file within 100 ms, one must win), hold them briefly and close them.
    case incident
    /// Every client wants one buffer, again and again, and waits in its line (`wait_ms`): claim, hold
    /// about 1 ms, release. Baton only (nothing else here has a line).
    case oneBufferWait = "one-buffer-wait"
    /// The same, polling: a denied client sleeps the poll interval (jittered ±50 %) and claims again.
    case oneBufferPoll = "one-buffer-poll"
    /// Collaborators, in the incident's shape: 1,024 users on 4 frontends join shared projects (64 users
    /// each) in bursts, each within 100 ms of its last, stay 1-20 ms and leave; every join takes the
    /// smallest free replica id. Baton against PostgreSQL at SERIALIZABLE with retries and at READ
    /// COMMITTED (the control); the load counts ids handed to a second live member.
    case joinStorm = "join-storm"

    /// Distinct buffers when none are given.
    public var defaultBuffers: Int {
        switch self {
        case .openStorm: 100_000
        case .hot: 8
        case .oneBufferWait, .oneBufferPoll: 1
        case .joinStorm: 16  // projects
        case .renewHeavy, .incident: 0  // one buffer per client, or a fresh file per pair and step
        }
    }

    /// Concurrent clients when none are given.
    public var defaultClients: Int { self == .incident || self == .joinStorm ? 1024 : 64 }

    /// Frontend processes when none are given, each with one `BatonClient` its callers share (a collab
    /// server runs one per process): the incident's users are on 4 frontends, every other load is one.
    public var defaultFrontends: Int { self == .incident || self == .joinStorm ? 4 : 1 }

    /// Whether every client contends for one buffer, one grant after another.
    public var isLine: Bool { self == .oneBufferWait || self == .oneBufferPoll }

    /// Whether `system` can run this workload (waiting claims are Baton's; the echo worker grants
    /// everything, and naive check-then-act is no lock to wait for; replica ids are Baton's and the two
    /// membership systems', which have nothing else).
    public func runs(on system: String) -> Bool {
        if BenchSettings.membershipSystems.contains(system) { return self == .joinStorm }
        switch self {
        case .oneBufferWait: return system == "baton"
        case .oneBufferPoll: return system == "baton" || system == "postgres"
        case .joinStorm: return system == "baton"
        default: return true
        }
    }

    /// Why `system` does not run this workload (when ``runs(on:)`` is false).
    public func notRun(on system: String) -> String {
        if BenchSettings.membershipSystems.contains(system) { return "replica ids only (join-storm)" }
        switch self {
        case .oneBufferWait: return "only Baton has a line to wait in"
        case .joinStorm: return "no replica ids"
        default: return "no lock to poll"
        }
    }
}

/// What one system did under one workload.
struct Measurement: Sendable {
    var operations = 0
    var errors = 0
    var seconds = 0.0
    var latencies: [Double] = []  // milliseconds, sorted
    var doubleGrants: Int?
    /// Callers of a closed loop (nil for an open loop).
    var clients: Int?
    /// Claims sent (first sends, not resends) per operation: one-buffer workloads, where an operation is a grant.
    var claimsPerOperation: Double?
    /// One-buffer workloads: from each release's send to the next grant's answer, milliseconds, sorted.
    var handoffs: [Double] = []
    /// `join-storm`: joins answered with a replica id that another member still held (from its join's
    /// answer until its leave was sent), as the load saw them.
    var duplicateReplicaIDs: Int?
    /// `join-storm`: the membership violations the history checker finds in the audit trail (Baton).
    var membershipViolations: Int?
    /// Transactions tried again after a serialization failure or a deadlock (PostgreSQL at SERIALIZABLE).
    var serializationRetries: Int?

    var perSecond: Double { seconds > 0 ? Double(operations) / seconds : 0 }

    func percentile(_ q: Double) -> Double { Self.percentile(q, of: latencies) }

    func handoffPercentile(_ q: Double) -> Double { Self.percentile(q, of: handoffs) }

    private static func percentile(_ q: Double, of sorted: [Double]) -> Double {
        guard !sorted.isEmpty else { return 0 }
        let index = min(sorted.count - 1, max(0, Int((Double(sorted.count) * q).rounded(.up)) - 1))
        return sorted[index]
    }

    /// The latency CDF as (milliseconds, fraction) points, at most `points` of them.
    func cdf(points: Int = 60) -> [(Double, Double)] {
        guard !latencies.isEmpty else { return [] }
        return (1...points).map { step in
            let q = Double(step) / Double(points)
            return (percentile(q), q)
        }
    }
}

/// Drives one workload against one system, closed loop (as fast as answers come) or open loop (fixed rate).
struct BenchRunner: Sendable {
    let workload: Workload
    let system: any BenchSystem
    let clients: Int
    let buffers: Int
    let label: String
    let runID: String
    /// How long a polling client sleeps after a denial (one-buffer-poll), jittered ±50 %.
    var pollInterval: Duration = .milliseconds(20)
    /// How long a waiting claim waits (one-buffer-wait); one whose wait runs out claims again.
    var wait: Duration = .seconds(30)

    private final class Counters: Sendable {
        let next = Atomic<Int>(0)
        let operations = Atomic<Int>(0)
        let errors = Atomic<Int>(0)
        let latencies = Mutex<[Double]>([])
        /// Each client's next step (incident).
        let steps = Mutex<[Int: Int]>([:])
        /// One-buffer workloads: claims sent, the last release's send (taken by the next grant), and the
        /// handoff times.
        let claims = Atomic<Int>(0)
        let lastRelease = Mutex<ContinuousClock.Instant?>(nil)
        let handoffs = Mutex<[Double]>([])
        /// `join-storm`: the live member of each project's replica ids (the client), and the joins that
        /// were given an id another member held.
        let members = Mutex<[String: [Int: Int]]>([:])
        let duplicateReplicaIDs = Atomic<Int>(0)

        /// `client` was told it holds `id` of `project`: a duplicate when another client still holds it.
        func joined(_ project: String, id: Int, client: Int) {
            let taken = members.withLock { members in
                if let holder = members[project, default: [:]][id], holder != client { return true }
                members[project, default: [:]][id] = client
                return false
            }
            if taken { duplicateReplicaIDs.add(1, ordering: .relaxed) }
        }

        /// `client` is about to leave: from now on its id may go to another.
        func leaving(_ project: String, id: Int, client: Int) {
            members.withLock { members in
                if members[project]?[id] == client { members[project]?[id] = nil }
            }
        }
    }

    /// Claims each client's own buffer before a renew-heavy run; returns the tokens.
    func prepare() async throws -> [Int64] {
        guard workload == .renewHeavy else { return [] }
        var tokens: [Int64] = []
        for client in 0..<clients {
            guard let token = try await system.claim(client: client, buffer: "renew/\(runID)/\(client)") else {
                throw ScratchError("\(label): could not claim the buffer of client \(client) before renewing")
            }
            tokens.append(token)
        }
        return tokens
    }

    /// One operation of the workload for `client`; returns its latency in ms (the claim's, or the renew's).
    private func operation(client: Int, tokens: [Int64], counters: Counters) async throws -> Double {
        let start = ContinuousClock.now
        func elapsed() -> Double { (ContinuousClock.now - start).milliseconds }
        switch workload {
        case .openStorm:
            let index = counters.next.add(1, ordering: .relaxed).newValue
            _ = try await system.claim(client: client, buffer: "storm/\(runID)/\(index % max(1, buffers))")
            return elapsed()
        case .hot:
            let buffer = "hot/\(runID)/\(Int.random(in: 0..<max(1, buffers)))"
            let token = try await system.claim(client: client, buffer: buffer)
            let latency = elapsed()
            if let token {
                try await Task.sleep(for: .milliseconds(1))
                try await system.release(client: client, buffer: buffer, token: token)
            }
            return latency
        case .renewHeavy:
            _ = try await system.renew(client: client, buffer: "renew/\(runID)/\(client)", token: tokens[client])
            return elapsed()
        case .incident:
            // Clients 2k and 2k+1 are a pair; their n-th files are the same. Each waits 0-100 ms (the
            // two open it within 100 ms of each other), claims it, and the one granted holds it 1 ms and
            // closes it.
            let step = counters.steps.withLock { steps in
                defer { steps[client, default: 0] += 1 }
                return steps[client, default: 0]
            }
            try await Task.sleep(for: .milliseconds(Int.random(in: 0...100)))
            let buffer = "incident/\(runID)/\(client / 2)/\(step)"
            let begin = ContinuousClock.now
            let token = try await system.claim(client: client, buffer: buffer)
            let latency = (ContinuousClock.now - begin).milliseconds
            if let token {
                try await Task.sleep(for: .milliseconds(1))
                try await system.release(client: client, buffer: buffer, token: token)
            }
            return latency
        case .oneBufferWait, .oneBufferPoll:
            let buffer = "line/\(runID)"
            var token: Int64?
            while token == nil {
                counters.claims.add(1, ordering: .relaxed)
                if workload == .oneBufferWait {
                    token = try await system.claim(client: client, buffer: buffer, wait: wait)  // nil: the wait ran out
                } else {
                    token = try await system.claim(client: client, buffer: buffer)
                    if token == nil { try await Task.sleep(for: pollInterval * Double.random(in: 0.5...1.5)) }
                }
            }
            let latency = elapsed()
            let granted = ContinuousClock.now
            if let released = counters.lastRelease.withLock({ last in defer { last = nil }; return last }) {
                counters.handoffs.withLock { $0.append((granted - released).milliseconds) }
            }
            try await Task.sleep(for: .milliseconds(1))
            counters.lastRelease.withLock { $0 = .now }
            try await system.release(client: client, buffer: buffer, token: token!)
            return latency
        case .joinStorm:
            // Each user's project is one of `buffers` (users in blocks, so that one project's users are on
            // every frontend and every pooled connection); it joins within 100 ms of its last leave, holds
            // its replica id 1-20 ms and leaves.
            let project = "project/\(runID)/\(client * max(1, buffers) / max(1, clients))"
            try await Task.sleep(for: .milliseconds(Int.random(in: 0...100)))
            let begin = ContinuousClock.now
            let membership = try await system.join(client: client, buffer: project)
            let latency = (ContinuousClock.now - begin).milliseconds
            counters.joined(project, id: membership.replicaID, client: client)
            try await Task.sleep(for: .milliseconds(Int.random(in: 1...20)))
            counters.leaving(project, id: membership.replicaID, client: client)
            try await system.leave(client: client, buffer: project, token: membership.token)
            return latency
        }
    }

    /// Runs `clients` loops for `duration`, printing a live line.
    func closedLoop(duration: Duration, tokens: [Int64]) async -> Measurement {
        let counters = Counters()
        let start = ContinuousClock.now
        let deadline = start + duration
        let live = liveLine(counters: counters, start: start, duration: duration)
        await withTaskGroup(of: [Double].self) { group in
            for client in 0..<clients {
                group.addTask {
                    var latencies: [Double] = []
                    while ContinuousClock.now < deadline {
                        do {
                            latencies.append(try await operation(client: client, tokens: tokens, counters: counters))
                            counters.operations.add(1, ordering: .relaxed)
                        } catch {
                            counters.errors.add(1, ordering: .relaxed)
                        }
                    }
                    return latencies
                }
            }
            for await latencies in group { counters.latencies.withLock { $0 += latencies } }
        }
        live.cancel()
        var result = measurement(counters, seconds: (ContinuousClock.now - start).seconds)
        result.clients = clients
        return result
    }

    /// Starts operations at `rate` per second for `duration` regardless of answers (latency under a fixed load).
    func openLoop(rate: Double, duration: Duration, tokens: [Int64]) async -> Measurement {
        let counters = Counters()
        let start = ContinuousClock.now
        let interval = Duration.seconds(1.0 / max(rate, 1))
        let total = Int(rate * duration.seconds)
        let live = liveLine(counters: counters, start: start, duration: duration)
        await withTaskGroup(of: Void.self) { group in
            for index in 0..<total {
                let due = start + interval * Double(index)
                if due > ContinuousClock.now { try? await Task.sleep(until: due) }
                group.addTask {
                    do {
                        let latency = try await operation(client: index % clients, tokens: tokens, counters: counters)
                        counters.operations.add(1, ordering: .relaxed)
                        counters.latencies.withLock { $0.append(latency) }
                    } catch {
                        counters.errors.add(1, ordering: .relaxed)
                    }
                }
            }
        }
        live.cancel()
        return measurement(counters, seconds: (ContinuousClock.now - start).seconds)
    }

    private func measurement(_ counters: Counters, seconds: Double) -> Measurement {
        var result = Measurement()
        result.operations = counters.operations.load(ordering: .relaxed)
        result.errors = counters.errors.load(ordering: .relaxed)
        result.seconds = seconds
        result.latencies = counters.latencies.withLock { $0 }.sorted()
        if workload == .joinStorm { result.duplicateReplicaIDs = counters.duplicateReplicaIDs.load(ordering: .relaxed) }
        if workload.isLine {
            result.handoffs = counters.handoffs.withLock { $0 }.sorted()
            if result.operations > 0 { result.claimsPerOperation = Double(counters.claims.load(ordering: .relaxed)) / Double(result.operations) }
        }
        return result
    }

    private func liveLine(counters: Counters, start: ContinuousClock.Instant, duration: Duration) -> Task<Void, Never> {
        let label = self.label
        return Task {
            while !Task.isCancelled {
                try? await Task.sleep(for: .seconds(1))
                let elapsed = (ContinuousClock.now - start).seconds
                let operations = counters.operations.load(ordering: .relaxed)
                let rate = elapsed > 0 ? Int(Double(operations) / elapsed) : 0
                let line = "\r  \(label) \(Int(elapsed))/\(Int(duration.seconds)) s  \(rate) ops/s  errors \(counters.errors.load(ordering: .relaxed))   "
                FileHandle.standardError.write(Data(line.utf8))
            }
        }
    }
}

extension Duration {
    var seconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
    var milliseconds: Double { seconds * 1000 }
}
