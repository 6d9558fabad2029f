import BatonPostgres
import Foundation
import Logging

/// The fixed-rate run at half of Baton's closed-loop peak.
struct OpenLoopRun: Sendable {
    /// Operations started per second, whatever the answers.
    var rate: Double
    var measurement: Measurement
    /// Requests the frontends published per operation (1 when no call was resent).
    var requestsPerCall: Double? = nil
    /// For an overload run: the peak it doubles (the most answers per second seen open loop).
    var peak: Double? = nil

    var json: [String: Any] {
        var object: [String: Any] = [
            "rate_per_s": round1(rate),
            "achieved_per_s": round1(measurement.perSecond),
            "p50_ms": round3(measurement.percentile(0.5)),
            "p99_ms": round3(measurement.percentile(0.99)),
            "p999_ms": round3(measurement.percentile(0.999)),
            "errors": measurement.errors,
        ]
        if let requestsPerCall { object["requests_per_call"] = round3(requestsPerCall) }
        if let peak { object["peak_per_s"] = round1(peak) }
        return object
    }
}

/// The bench worker's resident memory, sampled every second.
struct WorkerMemory: Sendable {
    var samples: [Double] = []
}

/// One system's numbers under one workload.
struct SystemResult: Sendable {
    var measurement: Measurement
    var halfPeak: OpenLoopRun?
    /// An open-loop run at twice the closed loop's peak (`--overload`).
    var overload: OpenLoopRun?
    var workerMemory: WorkerMemory?
    /// The worker's CPU time per operation, in microseconds (from /proc, over the closed-loop run).
    var workerCPUPerOperation: Double?
    /// The worker's CPU time per second while it serves its partitions and nothing is sent, in
    /// milliseconds (a few seconds before the run, from /proc's per-thread scheduler times).
    var workerIdleCPU: Double?
    /// The whole machine's CPU time per operation by part (broker, PostgreSQL, worker, load generator), in
    /// microseconds, over the closed-loop run (from /proc).
    var machineCPU: [MachineCPU.Part: Double] = [:]
    /// PostgreSQL transactions (commits and rollbacks of the run's database) per operation.
    var databaseTransactionsPerOperation: Double?
    /// Requests per message the clients published (above 1 when calls were coalesced).
    var requestsPerMessage: Double?
    /// Messages the broker took per operation (requests, replies, events; from the management API).
    var brokerMessagesPerOperation: Double?
    /// The worker's requests per batch and mean commit time (ms), over its life (closed loop and half peak).
    var meanBatch: Double?
    var meanCommitMilliseconds: Double?
    /// The share of the worker's store transactions decided from memory, without a read (0-1).
    var fromMemory: Double?
    /// PostgreSQL connections the worker held during the run.
    var databaseConnections: Int?
    /// The PostgreSQL pool size measured, and the claims/s of each size tried in the sweep.
    var poolSize: Int?
    var poolSweep: [Int: Double] = [:]

    var summary: String {
        var text = String(format: "%9.0f ops/s  p50 %6.2f ms  p99 %6.2f ms  p99.9 %7.2f ms  errors %d",
                          measurement.perSecond, measurement.percentile(0.5), measurement.percentile(0.99), measurement.percentile(0.999), measurement.errors)
        text += "  double grants \(measurement.doubleGrants.map(String.init) ?? "-")"
        if let duplicates = measurement.duplicateReplicaIDs {
            text += "  duplicate replica ids \(duplicates)"
            if let violations = measurement.membershipViolations { text += " (history checker: \(violations) violations)" }
        }
        if let retries = measurement.serializationRetries {
            text += String(format: "  serialization retries %d (%.2f per op)", retries, Double(retries) / Double(max(1, measurement.operations)))
        }
        if let claims = measurement.claimsPerOperation {
            text += String(format: "  | %.2f claims/grant, release→grant p50 %.2f ms p99 %.2f ms", claims, measurement.handoffPercentile(0.5), measurement.handoffPercentile(0.99))
        }
        if let halfPeak {
            text += String(format: "  | at %.0f/s: p50 %.2f ms p99 %.2f ms", halfPeak.rate, halfPeak.measurement.percentile(0.5), halfPeak.measurement.percentile(0.99))
        }
        if let overload {
            text += String(
                format: "  | at twice the open-loop peak of %.0f/s (%.0f/s offered): %.0f answered/s (%.0f %% of the peak), %d errors, p50 %.0f ms p99 %.0f ms, %.2f requests sent per call",
                overload.peak ?? 0, overload.rate, overload.measurement.perSecond, 100 * overload.measurement.perSecond / max(1, overload.peak ?? 0),
                overload.measurement.errors, overload.measurement.percentile(0.5), overload.measurement.percentile(0.99), overload.requestsPerCall ?? .nan
            )
        }
        if let memory = workerMemory, let max = memory.samples.max() {
            text += String(format: "  | worker RSS %.0f→%.0f MiB (max %.0f)", memory.samples.first ?? 0, memory.samples.last ?? 0, max)
        }
        if let cpu = workerCPUPerOperation { text += String(format: "  | worker CPU %.0f µs/op", cpu) }
        if let idle = workerIdleCPU { text += String(format: "  | worker idle %.1f ms/s", idle) }
        if !machineCPU.isEmpty {
            let parts = MachineCPU.Part.allCases.compactMap { part in machineCPU[part].map { "\(part.label) " + String(format: "%.0f", $0) } }
            text += String(format: "  | machine CPU %.0f µs/op (", machineCPU.values.reduce(0, +)) + parts.joined(separator: ", ") + ")"
        }
        if let transactions = databaseTransactionsPerOperation { text += String(format: "  | %.2f PostgreSQL transactions/op", transactions) }
        if let ratio = requestsPerMessage { text += String(format: "  | %.2f requests/message", ratio) }
        if let messages = brokerMessagesPerOperation { text += String(format: "  | %.2f broker messages/op", messages) }
        if let batch = meanBatch { text += String(format: "  | batch %.1f", batch) }
        if let commit = meanCommitMilliseconds { text += String(format: " (commit %.1f ms)", commit) }
        if let fromMemory { text += String(format: ", %.0f %% from memory", fromMemory * 100) }
        if let connections = databaseConnections { text += "  | \(connections) PostgreSQL connections" }
        if let poolSize {
            text += "  | pool \(poolSize)"
            if !poolSweep.isEmpty { text += " (sweep " + poolSweep.keys.sorted().map { String(format: "%d: %.0f/s", $0, poolSweep[$0]!) }.joined(separator: ", ") + ")" }
        }
        return text
    }

    func json() -> [String: Any] {
        var object: [String: Any] = [
            "claims_per_s": round1(measurement.perSecond),
            "p50_ms": round3(measurement.percentile(0.5)),
            "p99_ms": round3(measurement.percentile(0.99)),
            "p999_ms": round3(measurement.percentile(0.999)),
            "errors": measurement.errors,
            "double_grants": measurement.doubleGrants.map { $0 as Any } ?? NSNull(),
            "operations": measurement.operations,
            "callers": measurement.clients.map { $0 as Any } ?? NSNull(),
            "seconds": round3(measurement.seconds),
            "latency_cdf": measurement.cdf().map { [round3($0.0), round3($0.1)] },
        ]
        if let halfPeak { object["half_peak"] = halfPeak.json }
        if let duplicates = measurement.duplicateReplicaIDs { object["duplicate_replica_ids"] = duplicates }
        if let violations = measurement.membershipViolations { object["membership_violations"] = violations }
        if let retries = measurement.serializationRetries {
            object["serialization_retries"] = retries
            object["serialization_retries_per_op"] = round3(Double(retries) / Double(max(1, measurement.operations)))
        }
        if let overload { object["overload"] = overload.json }
        if let claims = measurement.claimsPerOperation {
            object["claims_per_grant"] = round3(claims)
            object["release_to_grant_ms"] = [
                "p50": round3(measurement.handoffPercentile(0.5)), "p99": round3(measurement.handoffPercentile(0.99)), "count": measurement.handoffs.count,
            ]
        }
        if let cpu = workerCPUPerOperation { object["worker_cpu_us_per_op"] = round1(cpu) }
        if let idle = workerIdleCPU { object["worker_idle_cpu_ms_per_s"] = round3(idle) }
        if !machineCPU.isEmpty {
            var parts: [String: Any] = ["total": round1(machineCPU.values.reduce(0, +))]
            for (part, value) in machineCPU { parts[part.rawValue] = round1(value) }
            object["machine_cpu_us_per_op"] = parts
        }
        if let transactions = databaseTransactionsPerOperation { object["database_transactions_per_op"] = round3(transactions) }
        if let ratio = requestsPerMessage { object["requests_per_message"] = round3(ratio) }
        if let messages = brokerMessagesPerOperation { object["broker_messages_per_op"] = round3(messages) }
        if let batch = meanBatch { object["mean_batch"] = round3(batch) }
        if let commit = meanCommitMilliseconds { object["mean_commit_ms"] = round3(commit) }
        if let fromMemory { object["from_memory"] = round3(fromMemory) }
        if let connections = databaseConnections { object["database_connections"] = connections }
        if let poolSize { object["pool_size"] = poolSize }
        if !poolSweep.isEmpty { object["pool_sweep"] = Dictionary(uniqueKeysWithValues: poolSweep.map { (String($0.key), round1($0.value)) }) }
        if let memory = workerMemory, !memory.samples.isEmpty {
            object["worker_rss_mib"] = [
                "first": round1(memory.samples.first!), "last": round1(memory.samples.last!), "max": round1(memory.samples.max()!),
                "samples": memory.samples.map(round1),
            ]
        }
        return object
    }
}

/// All systems under one workload.
struct WorkloadResult: Sendable {
    var systems: [String: SystemResult]

    func ratio(_ numerator: String, _ denominator: String) -> Double? {
        guard let top = systems[numerator]?.measurement.perSecond, let bottom = systems[denominator]?.measurement.perSecond, bottom > 0 else { return nil }
        return top / bottom
    }
}

/// Everything `baton bench` measured, as a table, JSON and an SVG chart.
public struct BenchReport: Sendable {
    var command: String
    var machine: [String: String]
    var workloads: [String: WorkloadResult] = [:]
    /// The rpc-ceiling tool's runs in the same bench run (`--rpc-ceiling`).
    var ceiling: [RPCCeiling.Run] = []
    /// The caller counts of the callers sweep, whose runs are the workloads `hot@N`.
    var sweep: [Int] = []

    /// The callers sweep on `hot` with the main run's `hot` row first: callers, and each system's result.
    func sweepRows() -> [(callers: Int, result: WorkloadResult)] {
        guard !sweep.isEmpty else { return [] }
        var rows: [(callers: Int, result: WorkloadResult)] = []
        if let hot = workloads[Workload.hot.rawValue], let callers = hot.systems["baton"]?.measurement.clients { rows.append((callers, hot)) }
        for callers in sweep.sorted() {
            if let result = workloads["\(Workload.hot.rawValue)@\(callers)"] { rows.append((callers, result)) }
        }
        return rows
    }

    /// The callers sweep as a table: claims/s, p99 and machine CPU per claim of each system, and the ratios.
    func sweepTable() -> [String] {
        let rows = sweepRows()
        guard !rows.isEmpty else { return [] }
        var lines = ["hot, callers sweep (one frontend; claims/s, p99 ms, machine CPU µs per claim)"]
        lines.append("  callers  baton                      postgres                   postgres-recorded          baton/postgres  baton/recorded")
        for row in rows {
            func cell(_ system: String) -> String {
                guard let value = row.result.systems[system] else { return "-".padding(toLength: 27, withPad: " ", startingAt: 0) }
                let cpu = value.machineCPU.isEmpty ? "-" : String(format: "%.0f", value.machineCPU.values.reduce(0, +))
                return String(format: "%7.0f/s %7.1f ms %6@ µs  ", value.measurement.perSecond, value.measurement.percentile(0.99), cpu)
            }
            let ratios = [row.result.ratio("baton", "postgres"), row.result.ratio("baton", "postgres-recorded")]
                .map { $0.map { String(format: "%.2fx", $0) } ?? "-" }
            lines.append(String(format: "  %7d  ", row.callers) + cell("baton") + cell("postgres") + cell("postgres-recorded")
                + ratios[0].padding(toLength: 16, withPad: " ", startingAt: 0) + ratios[1])
        }
        return lines + [""]
    }

    /// Echo against the C ceiling at 64 in flight, one request per message (the bench's 64 clients).
    func echoVersusCeiling(_ result: WorkloadResult) -> Double? {
        guard let echo = result.systems["echo"]?.measurement.perSecond,
              let ceiling = ceiling.first(where: { $0.window == 64 && $0.perMessage == 1 })?.messagesPerSecond, ceiling > 0
        else { return nil }
        return echo / ceiling
    }

    /// Baton's waiting claims against its polling claims (and direct PostgreSQL polling), one buffer.
    func waitingVersusPolling() -> String? {
        guard let waiting = workloads[Workload.oneBufferWait.rawValue]?.systems["baton"],
              let polling = workloads[Workload.oneBufferPoll.rawValue]?.systems["baton"], polling.measurement.perSecond > 0
        else { return nil }
        func messages(_ result: SystemResult) -> String { result.brokerMessagesPerOperation.map { String(format: "%.1f", $0) } ?? "-" }
        var text = String(
            format: "one buffer, waiting against polling (Baton): grants/s %.0f vs %.0f (%.2fx); broker messages per grant %@ vs %@; claims per grant %.2f vs %.2f; release→next grant p50 %.2f vs %.2f ms, p99 %.2f vs %.2f ms",
            waiting.measurement.perSecond, polling.measurement.perSecond, waiting.measurement.perSecond / polling.measurement.perSecond,
            messages(waiting), messages(polling), waiting.measurement.claimsPerOperation ?? 0, polling.measurement.claimsPerOperation ?? 0,
            waiting.measurement.handoffPercentile(0.5), polling.measurement.handoffPercentile(0.5),
            waiting.measurement.handoffPercentile(0.99), polling.measurement.handoffPercentile(0.99)
        )
        if let direct = workloads[Workload.oneBufferPoll.rawValue]?.systems["postgres"], direct.measurement.perSecond > 0 {
            text += String(format: "\n  direct PostgreSQL polling: %.0f grants/s (Baton waiting %.2fx), release→next grant p50 %.2f ms",
                           direct.measurement.perSecond, waiting.measurement.perSecond / direct.measurement.perSecond, direct.measurement.handoffPercentile(0.5))
        }
        return text
    }

    static let order = ["baton", "postgres", "postgres-recorded", "naive", "echo", "postgres-serializable", "postgres-read-committed"]
    static let colors = [
        "baton": "#2b6cb0", "postgres": "#2f855a", "postgres-recorded": "#b7791f", "naive": "#c53030", "echo": "#805ad5",
        "postgres-serializable": "#319795", "postgres-read-committed": "#d53f8c",
    ]

    static func machine(serverURL: PostgresURL, logger: Logger) async throws -> [String: String] {
        var info: [String: String] = [
            "cores": String(ProcessInfo.processInfo.activeProcessorCount),
            "memory_gib": String(format: "%.1f", Double(ProcessInfo.processInfo.physicalMemory) / 1_073_741_824),
            "os": ProcessInfo.processInfo.operatingSystemVersionString,
            "host": ProcessInfo.processInfo.hostName,
        ]
        if let cpu = try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8),
           let model = cpu.split(separator: "\n").first(where: { $0.hasPrefix("model name") })?.split(separator: ":").last {
            info["cpu"] = model.trimmingCharacters(in: .whitespaces)
        }
        let connection = try await PostgresConnection.connect(to: serverURL, logger: logger)
        info["postgresql"] = try await connection.withSession { session in try session.query("SHOW server_version").first() ?? "?" }
        info["postgresql_fsync"] = try await connection.withSession { session in try session.query("SHOW fsync").first() ?? "?" }
        await connection.close()
        return info
    }

    /// The report as JSON (results.json).
    public func json() throws -> Data {
        var workloadsObject: [String: Any] = [:]
        for (name, result) in workloads {
            var ratios: [String: Any] = [:]
            ratios["baton_vs_postgres"] = result.ratio("baton", "postgres").map { round3($0) as Any } ?? NSNull()
            ratios["baton_vs_postgres_recorded"] = result.ratio("baton", "postgres-recorded").map { round3($0) as Any } ?? NSNull()
            ratios["baton_vs_echo"] = result.ratio("baton", "echo").map { round3($0) as Any } ?? NSNull()
            if result.systems["postgres-serializable"] != nil {
                ratios["baton_vs_postgres_serializable"] = result.ratio("baton", "postgres-serializable").map { round3($0) as Any } ?? NSNull()
            }
            ratios["echo_vs_rpc_ceiling_w64"] = echoVersusCeiling(result).map { round3($0) as Any } ?? NSNull()
            workloadsObject[name] = ["systems": result.systems.mapValues { $0.json() }, "ratios": ratios]
        }
        var object: [String: Any] = ["workloads": workloadsObject, "machine": machine, "command": command]
        if let waiting = workloads[Workload.oneBufferWait.rawValue]?.systems["baton"]?.measurement.perSecond,
           let polling = workloads[Workload.oneBufferPoll.rawValue]?.systems["baton"]?.measurement.perSecond, polling > 0 {
            object["baton_waiting_vs_polling"] = round3(waiting / polling)
        }
        if !ceiling.isEmpty { object["rpc_ceiling"] = ceiling.map(\.json) }
        let sweep = sweepRows()
        if !sweep.isEmpty {
            object["callers_sweep"] = sweep.map { row -> [String: Any] in
                var entry: [String: Any] = ["callers": row.callers, "systems": row.result.systems.mapValues { $0.json() }]
                entry["baton_vs_postgres"] = row.result.ratio("baton", "postgres").map { round3($0) as Any } ?? NSNull()
                entry["baton_vs_postgres_recorded"] = row.result.ratio("baton", "postgres-recorded").map { round3($0) as Any } ?? NSNull()
                return entry
            }
        }
        return try JSONSerialization.data(withJSONObject: object, options: [.prettyPrinted, .sortedKeys])
    }

    /// A table per workload, with the ratios.
    public func table() -> String {
        var lines: [String] = []
        if !ceiling.isEmpty {
            lines.append("rpc-ceiling (plain rabbitmq-c, one quorum queue, same broker, same run)")
            for run in ceiling { lines.append("  \(run.summary)") }
            lines.append("")
        }
        if let waiting = waitingVersusPolling() { lines.append(waiting + "\n") }
        lines += sweepTable()
        for name in workloads.keys.sorted() {
            let result = workloads[name]!
            lines.append("\(name)")
            let joins = name == Workload.joinStorm.rawValue
            lines.append("  system                     \(joins ? "joins/s " : "claims/s")   p50 ms   p99 ms  p99.9 ms  errors  \(joins ? "dup. ids     " : "double grants")  machine CPU µs/op (broker, PostgreSQL, worker, bench)\(joins ? "  retries/join" : "")")
            for system in Self.order {
                guard let value = result.systems[system] else { continue }
                let m = value.measurement
                let numbers = String(format: "%11.0f %8.2f %8.2f %9.2f %7d", m.perSecond, m.percentile(0.5), m.percentile(0.99), m.percentile(0.999), m.errors)
                let grants = ((joins ? m.duplicateReplicaIDs : m.doubleGrants).map(String.init) ?? "-").padding(toLength: 13, withPad: " ", startingAt: 0)
                var cpu = ""
                if !value.machineCPU.isEmpty {
                    cpu = String(format: "%.0f (", value.machineCPU.values.reduce(0, +))
                        + MachineCPU.Part.allCases.map { part in value.machineCPU[part].map { String(format: "%.0f", $0) } ?? "-" }.joined(separator: ", ") + ")"
                }
                let retries = m.serializationRetries.map { String(format: "  %.2f", Double($0) / Double(max(1, m.operations))) } ?? ""
                lines.append("  \(system.padding(toLength: 23, withPad: " ", startingAt: 0))\(numbers)  \(grants)  \(cpu)\(retries)")
            }
            let ab = result.ratio("baton", "postgres").map { String(format: "%.2fx", $0) } ?? "-"
            let ad = result.ratio("baton", "echo").map { String(format: "%.0f%%", $0 * 100) } ?? "-"
            let ac = echoVersusCeiling(result).map { String(format: "   echo/rpc-ceiling(64 in flight) %.0f%%", $0 * 100) } ?? ""
            let recorded = result.ratio("baton", "postgres-recorded").map { String(format: "   baton/postgres-recorded %.2fx", $0) } ?? ""
            if joins {
                let serializable = result.ratio("baton", "postgres-serializable").map { String(format: "%.2fx", $0) } ?? "-"
                let control = result.ratio("baton", "postgres-read-committed").map { String(format: "%.2fx", $0) } ?? "-"
                lines.append("  baton/postgres-serializable \(serializable)   baton/postgres-read-committed \(control)")
            } else {
                lines.append("  baton/postgres \(ab)\(recorded)   baton/echo \(ad)\(ac)")
            }
            for system in Self.order {
                guard let value = result.systems[system], let claims = value.measurement.claimsPerOperation else { continue }
                let messages = value.brokerMessagesPerOperation.map { String(format: "%.1f", $0) } ?? "-"
                lines.append(String(format: "  %@ per grant: %.2f claims, %@ broker messages; release→next grant p50 %.2f ms, p99 %.2f ms",
                                    system, claims, messages, value.measurement.handoffPercentile(0.5), value.measurement.handoffPercentile(0.99)))
            }
            for system in Self.order {
                guard let half = result.systems[system]?.halfPeak else { continue }
                lines.append(String(format: "  %@ at half peak (%.0f/s): p50 %.2f ms, p99 %.2f ms, p99.9 %.2f ms", system, half.rate, half.measurement.percentile(0.5), half.measurement.percentile(0.99), half.measurement.percentile(0.999)))
            }
            lines.append("")
        }
        return lines.joined(separator: "\n")
    }

    /// Throughput per system and workload (bars), and the claim-latency CDF per workload (lines, log scale).
    /// Claims per second and latency CDFs as an SVG chart (results.svg).
    public func svg() -> String {
        let names = workloads.keys.sorted()
        let width = 960.0, barHeight = 300.0, cdfHeight = 260.0
        let height = barHeight + Double(names.count) * (cdfHeight + 30) + 60
        var out = ##"<svg xmlns="http://www.w3.org/2000/svg" width="\##(Int(width))" height="\##(Int(height))" font-family="sans-serif" font-size="12">"##
        out += ##"<rect width="100%" height="100%" fill="white"/>"##
        out += ##"<text x="20" y="24" font-size="16" font-weight="bold">Claims (join-storm: joins) per second by system and workload</text>"##
        // Bars.
        let maxRate = workloads.values.flatMap { $0.systems.values.map(\.measurement.perSecond) }.max() ?? 1
        let groupWidth = (width - 120) / Double(max(1, names.count))
        let barWidth = groupWidth / Double(Self.order.count + 1)
        let baseY = barHeight - 20
        out += ##"<line x1="80" y1="\##(baseY)" x2="\##(width - 20)" y2="\##(baseY)" stroke="black"/>"##
        for tick in 0...4 {
            let value = maxRate * Double(tick) / 4
            let y = baseY - (barHeight - 80) * Double(tick) / 4
            out += ##"<text x="74" y="\##(y + 4)" text-anchor="end">\##(Int(value))</text><line x1="80" y1="\##(y)" x2="\##(width - 20)" y2="\##(y)" stroke="#ddd"/>"##
        }
        for (groupIndex, name) in names.enumerated() {
            let x0 = 90 + Double(groupIndex) * groupWidth
            for (index, system) in Self.order.enumerated() {
                guard let rate = workloads[name]?.systems[system]?.measurement.perSecond else { continue }
                let h = (barHeight - 80) * rate / maxRate
                let x = x0 + Double(index) * barWidth
                out += ##"<rect x="\##(x)" y="\##(baseY - h)" width="\##(barWidth - 4)" height="\##(h)" fill="\##(Self.colors[system]!)"/>"##
                out += ##"<text x="\##(x + barWidth / 2 - 2)" y="\##(baseY - h - 4)" text-anchor="middle" font-size="10">\##(Int(rate))</text>"##
            }
            out += ##"<text x="\##(x0 + groupWidth / 2 - barWidth / 2)" y="\##(baseY + 16)" text-anchor="middle">\##(name)</text>"##
        }
        // The legend, right-aligned, each entry as wide as its name (about 6 px a character at 10 px).
        var legendX = width - 20 - Self.order.reduce(0) { $0 + 28 + 6 * Double($1.count) }
        for system in Self.order {
            out += ##"<rect x="\##(legendX)" y="32" width="12" height="12" fill="\##(Self.colors[system]!)"/><text x="\##(legendX + 16)" y="42" font-size="10">\##(system)</text>"##
            legendX += 28 + 6 * Double(system.count)
        }
        // CDFs.
        for (panel, name) in names.enumerated() {
            let top = barHeight + 30 + Double(panel) * (cdfHeight + 30)
            let left = 80.0, right = width - 20, bottom = top + cdfHeight - 30
            out += ##"<text x="20" y="\##(top)" font-size="14" font-weight="bold">\##(name): \##(name == Workload.joinStorm.rawValue ? "join" : "claim") latency CDF (ms, log scale)</text>"##
            out += ##"<rect x="\##(left)" y="\##(top + 10)" width="\##(right - left)" height="\##(bottom - top - 10)" fill="none" stroke="black"/>"##
            let all = workloads[name]!.systems.values.flatMap(\.measurement.latencies)
            let lo = max(0.05, all.min() ?? 0.1), hi = max(lo * 10, all.max() ?? 1)
            func x(_ ms: Double) -> Double { left + (right - left) * (log10(max(ms, lo)) - log10(lo)) / (log10(hi) - log10(lo)) }
            func y(_ q: Double) -> Double { bottom - (bottom - top - 10) * q }
            var decade = pow(10, floor(log10(lo)))
            while decade <= hi {
                if decade >= lo {
                    out += ##"<line x1="\##(x(decade))" y1="\##(top + 10)" x2="\##(x(decade))" y2="\##(bottom)" stroke="#ddd"/><text x="\##(x(decade))" y="\##(bottom + 14)" text-anchor="middle">\##(decade < 1 ? String(decade) : String(Int(decade)))</text>"##
                }
                decade *= 10
            }
            for q in [0.5, 0.99] {
                out += ##"<line x1="\##(left)" y1="\##(y(q))" x2="\##(right)" y2="\##(y(q))" stroke="#eee"/><text x="\##(left - 6)" y="\##(y(q) + 4)" text-anchor="end">p\##(Int(q * 100))</text>"##
            }
            for system in Self.order {
                guard let points = workloads[name]?.systems[system]?.measurement.cdf(points: 200), !points.isEmpty else { continue }
                let path = points.map { "\(x($0.0)),\(y($0.1))" }.joined(separator: " ")
                out += ##"<polyline fill="none" stroke="\##(Self.colors[system]!)" stroke-width="2" points="\##(path)"/>"##
            }
        }
        return out + "</svg>\n"
    }
}

private func round1(_ value: Double) -> Double { (value * 10).rounded() / 10 }
private func round3(_ value: Double) -> Double { (value * 1000).rounded() / 1000 }
