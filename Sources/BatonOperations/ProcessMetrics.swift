import BatonWorker
import Foundation
import Prometheus

/// The worker's own process in Prometheus's standard names (resident and virtual memory, CPU seconds,
/// open and allowed file descriptors, start time), read from `/proc/self` at each scrape, and
/// `baton_build_info` (1, labelled with the release, the commit and the build date).
///
/// swift-metrics 2.13 and swift-prometheus 2.4 ship no process collector (swift-metrics' old
/// `SystemMetrics` left it), so these few values are read here; on a system without `/proc` they stay 0.
final class ProcessMetrics: Sendable {
    private let residentMemory: Gauge
    private let virtualMemory: Gauge
    private let cpuSeconds: Gauge
    private let openDescriptors: Gauge
    private let maxDescriptors: Gauge
    private let startTime: Gauge

    init(registry: PrometheusCollectorRegistry, build: BuildLabels) {
        residentMemory = registry.gauge("process_resident_memory_bytes", help: "Resident memory size in bytes.")
        virtualMemory = registry.gauge("process_virtual_memory_bytes", help: "Virtual memory size in bytes.")
        // A gauge set to the total at each scrape: a counter could only be incremented by deltas.
        cpuSeconds = registry.gauge("process_cpu_seconds_total", help: "Total user and system CPU time spent in seconds.")
        openDescriptors = registry.gauge("process_open_fds", help: "Number of open file descriptors.")
        maxDescriptors = registry.gauge("process_max_fds", help: "Maximum number of open file descriptors.")
        startTime = registry.gauge("process_start_time_seconds", help: "Start time of the process since unix epoch in seconds.")
        registry.gauge(
            "baton_build_info", labels: [("version", build.version), ("commit", build.commit), ("built", build.date)],
            help: "Always 1: the worker's release, the git commit it was built from and its build date."
        ).set(to: 1.0)
        update()
    }

    /// Reads `/proc/self` now.
    func update() {
        guard let sample = Self.read() else { return }
        residentMemory.set(sample.residentBytes)
        virtualMemory.set(sample.virtualBytes)
        cpuSeconds.set(sample.cpuSeconds)
        openDescriptors.set(sample.openDescriptors)
        if let limit = sample.maxDescriptors { maxDescriptors.set(limit) }
        if let start = sample.startTime { startTime.set(start) }
    }

    struct Sample {
        var residentBytes: Int64
        var virtualBytes: Int64
        var cpuSeconds: Double
        var openDescriptors: Int64
        var maxDescriptors: Int64?
        var startTime: Double?
    }

    /// One reading of `/proc/self/stat`, `/proc/self/fd`, `/proc/self/limits` and `/proc/stat`'s boot time.
    static func read() -> Sample? {
        guard let stat = try? String(contentsOfFile: "/proc/self/stat", encoding: .utf8),
              let close = stat.lastIndex(of: ")") else { return nil }
        // Fields after the command name (which may contain spaces), from field 3 (state) on.
        let fields = stat[stat.index(after: close)...].split(separator: " ")
        func field(_ number: Int) -> Double? { fields.count > number - 3 ? Double(fields[number - 3]) : nil }
        guard let utime = field(14), let stime = field(15), let vsize = field(23), let rss = field(24) else { return nil }
        let ticks = Double(sysconf(Int32(_SC_CLK_TCK)))
        let page = Int64(sysconf(Int32(_SC_PAGESIZE)))
        let descriptors = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd").count) ?? 0
        var sample = Sample(
            residentBytes: Int64(rss) * page, virtualBytes: Int64(vsize), cpuSeconds: (utime + stime) / ticks, openDescriptors: Int64(descriptors)
        )
        var limit = rlimit()
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0 { sample.maxDescriptors = Int64(clamping: limit.rlim_cur) }
        if let started = field(22), let boot = bootTime() { sample.startTime = boot + started / ticks }
        return sample
    }

    private static func bootTime() -> Double? {
        guard let text = try? String(contentsOfFile: "/proc/stat", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("btime ") {
            return Double(line.dropFirst(6).trimmingCharacters(in: .whitespaces))
        }
        return nil
    }
}

/// What `baton_build_info` says.
public struct BuildLabels: Sendable {
    public var version: String
    public var commit: String
    public var date: String

    public init(version: String, commit: String, date: String) {
        self.version = version
        self.commit = commit
        self.date = date
    }
}

/// `/health/ready`'s answer as gauges, set at each scrape, so that Prometheus can alert on it:
/// `baton_ready` (1 or 0), `baton_partitions_stalled` (partitions whose database calls keep failing),
/// `baton_partitions_not_consumed`, `baton_publishing_blocked` (1 while the broker's alarm blocks the
/// worker's publishing) and `baton_reply_connected` (1 while the reply connection is open).
final class ReadinessMetrics: Sendable {
    private let ready: Gauge
    private let stalled: Gauge
    private let notConsumed: Gauge
    private let blocked: Gauge
    private let replyConnected: Gauge

    init(registry: PrometheusCollectorRegistry) {
        ready = registry.gauge("baton_ready", help: "1 when /health/ready answers 200.")
        stalled = registry.gauge("baton_partitions_stalled", help: "Served partitions whose database calls keep failing.")
        notConsumed = registry.gauge("baton_partitions_not_consumed", help: "Served partitions without a live consumer.")
        blocked = registry.gauge("baton_publishing_blocked", help: "1 while the broker blocks the worker's publishing (resource alarm).")
        replyConnected = registry.gauge("baton_reply_connected", help: "1 while the connection that carries replies is open.")
    }

    func update(_ state: WorkerReadiness) {
        ready.set(to: state.isReady ? 1 : 0)
        stalled.set(to: Double(state.stalled.count))
        notConsumed.set(to: Double(Set(state.partitions).subtracting(state.consuming).count))
        blocked.set(to: state.publishingBlocked == nil ? 0 : 1)
        replyConnected.set(to: state.replyConnected ? 1 : 0)
    }
}

extension PrometheusCollectorRegistry {
    /// A gauge named `name` (already fully qualified: no unit is appended), through the descriptor API
    /// that replaced `makeGauge(name:help:)`.
    fileprivate func gauge(_ name: String, labels: [(String, String)] = [], help: String) -> Gauge {
        makeGauge(descriptor: MetricNameDescriptor(metricName: name, unitName: "", helpText: help), labels: labels)
    }
}
