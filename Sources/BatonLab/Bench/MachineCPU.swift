import Foundation

/// CPU time used by each part of the machine, read from `/proc/PID/stat` (user + system): the broker
/// (RabbitMQ's `beam.smp`), PostgreSQL (every `postgres` process), the bench's worker (when one runs)
/// and the load generator (this process). Two readings around a run give each part's cost per operation.
struct MachineCPU: Sendable {
    /// The parts, in the order they are printed.
    enum Part: String, CaseIterable, Sendable {
        case broker, postgresql, worker, loadGenerator = "load_generator"

        /// How the table names it.
        var label: String {
            switch self {
            case .broker: "broker"
            case .postgresql: "PostgreSQL"
            case .worker: "worker"
            case .loadGenerator: "bench"
            }
        }
    }

    /// Microseconds of CPU per process id, with the part it belongs to.
    private var processes: [Int32: (part: Part, microseconds: Int64)] = [:]

    /// Reads every process of the machine now; `worker` is the bench's worker process, if any.
    static func read(worker: Int32?) -> MachineCPU {
        var reading = MachineCPU()
        let me = getpid()
        let ticks = Int64(max(1, sysconf(Int32(_SC_CLK_TCK))))
        guard let names = try? FileManager.default.contentsOfDirectory(atPath: "/proc") else { return reading }
        for name in names {
            guard let pid = Int32(name), let stat = try? String(contentsOfFile: "/proc/\(name)/stat", encoding: .utf8),
                  let open = stat.firstIndex(of: "("), let close = stat.lastIndex(of: ")")
            else { continue }
            let command = stat[stat.index(after: open)..<close]
            let part: Part
            if pid == me {
                part = .loadGenerator
            } else if pid == worker {
                part = .worker
            } else if command == "beam.smp" {
                part = .broker
            } else if command == "postgres" {
                part = .postgresql
            } else {
                continue
            }
            let fields = stat[stat.index(after: close)...].split(separator: " ")
            guard fields.count > 13, let user = Int64(fields[11]), let system = Int64(fields[12]) else { continue }
            reading.processes[pid] = (part, (user + system) * 1_000_000 / ticks)
        }
        return reading
    }

    /// Microseconds of CPU each part used from `earlier` to this reading, per operation. A process that
    /// started in between counts whole; one that ended in between is not seen.
    func perOperation(since earlier: MachineCPU, operations: Int) -> [Part: Double] {
        guard operations > 0 else { return [:] }
        var used: [Part: Int64] = [:]
        for (pid, now) in processes {
            used[now.part, default: 0] += now.microseconds - (earlier.processes[pid].map { $0.part == now.part ? $0.microseconds : 0 } ?? 0)
        }
        return used.mapValues { Double($0) / Double(operations) }
    }
}
