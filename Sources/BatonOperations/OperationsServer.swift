import BatonCore
import BatonWorker
import Foundation
import Hummingbird
import Logging
import Metrics
import Prometheus
import ServiceLifecycle

/// The worker's operations endpoint: Prometheus metrics and health checks over HTTP.
///
/// - `GET /metrics`: every swift-metrics metric, in Prometheus text format, with the process's own
///   (``ProcessMetrics``: memory, CPU seconds, descriptors, start time) and `baton_build_info`.
/// - `GET /health/live`: 200 while the process serves HTTP.
/// - `GET /health/ready`: 200 when the worker is connected to RabbitMQ (its reply connection included) and
///   PostgreSQL, consumes every partition it serves (as active consumer or hot standby), no partition is
///   stalled and the broker does not block its publishing; 503 otherwise. The body says which
///   (``readinessBody(_:)``).
public enum OperationsServer {
    /// Creates the Prometheus registry and makes it swift-metrics' backend. Call once, at start.
    public static func bootstrapMetrics() -> PrometheusCollectorRegistry {
        let registry = PrometheusCollectorRegistry()
        var factory = PrometheusMetricsFactory(registry: registry)
        factory.defaultDurationHistogramBuckets = [
            .microseconds(250), .microseconds(500), .milliseconds(1), .milliseconds(2), .milliseconds(5), .milliseconds(10),
            .milliseconds(25), .milliseconds(50), .milliseconds(100), .milliseconds(250), .milliseconds(500), .seconds(1), .seconds(5),
        ]
        factory.defaultValueHistogramBuckets = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]
        MetricsSystem.bootstrap(factory)
        return registry
    }

    /// The HTTP application, to run in the worker's `ServiceGroup`.
    public static func application(
        host: String, port: Int, registry: PrometheusCollectorRegistry, build: BuildLabels? = nil, readiness: @escaping @Sendable () -> WorkerReadiness,
        logger: Logger
    ) -> some Service {
        let router = Router()
        let process = build.map { ProcessMetrics(registry: registry, build: $0) }
        let ready = ReadinessMetrics(registry: registry)
        router.get("metrics") { _, _ -> Response in
            process?.update()
            ready.update(readiness())
            var buffer = ByteBuffer()
            buffer.writeBytes(registry.emitToBuffer())
            return Response(
                status: .ok, headers: [.contentType: "text/plain; version=0.0.4; charset=utf-8"], body: .init(byteBuffer: buffer)
            )
        }
        router.get("health/live") { _, _ -> Response in
            Response(status: .ok, headers: [.contentType: "application/json"], body: .init(byteBuffer: ByteBuffer(string: #"{"status":"live"}"#)))
        }
        router.get("health/ready") { _, _ -> Response in
            let state = readiness()
            let body = readinessBody(state)
            return Response(
                status: state.isReady ? .ok : .serviceUnavailable, headers: [.contentType: "application/json"],
                body: .init(byteBuffer: ByteBuffer(string: body))
            )
        }
        return Application(
            router: router,
            configuration: ApplicationConfiguration(address: .hostname(host, port: port), serverName: "baton"),
            logger: logger
        )
    }

    /// The JSON of `/health/ready`: the verdict and every reason behind it.
    ///
    /// ```json
    /// {"status":"not_ready","broker_connected":true,"database_connected":true,"reply_connected":true,"partitions":16,
    ///  "partitions_not_consumed":[],"partitions_stalled":{"3":"the database refused ..."},"publishing_blocked":null}
    /// ```
    public static func readinessBody(_ state: WorkerReadiness) -> String {
        var bytes: [UInt8] = []
        func string(_ value: String) { JSONText.appendString(value, to: &bytes) }
        bytes += #"{"status":"#.utf8
        string(state.isReady ? "ready" : "not_ready")
        bytes += #","broker_connected":\#(state.brokerConnected),"database_connected":\#(state.databaseConnected)"#.utf8
        bytes += #","reply_connected":\#(state.replyConnected),"partitions":\#(state.partitions.count)"#.utf8
        bytes += #","partitions_not_consumed":\#(Set(state.partitions).subtracting(state.consuming).sorted())"#.utf8
        bytes += #","partitions_stalled":{"#.utf8
        for (index, (partition, reason)) in state.stalled.sorted(by: { $0.key < $1.key }).enumerated() {
            if index > 0 { bytes.append(UInt8(ascii: ",")) }
            string(String(partition))
            bytes.append(UInt8(ascii: ":"))
            string(reason)
        }
        bytes += #"},"publishing_blocked":"#.utf8
        if let blocked = state.publishingBlocked { string(blocked) } else { bytes += "null".utf8 }
        bytes += "}".utf8
        return String(decoding: bytes, as: UTF8.self)
    }

    /// Runs `worker` until SIGTERM or SIGINT (it then finishes its batch in hand and closes), with the
    /// operations endpoint on `host:port` beside it unless `port` is 0.
    public static func serve(_ worker: Worker, host: String, port: Int, build: BuildLabels, logger: Logger) async throws {
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [.init(service: worker)]
        if port > 0 {
            let registry = bootstrapMetrics()
            services.append(.init(service: application(host: host, port: port, registry: registry, build: build, readiness: { worker.readiness }, logger: logger)))
        }
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}
