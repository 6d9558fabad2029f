import BatonWorker
import Foundation
import Hummingbird
import Logging
import Metrics
import Prometheus
import ServiceLifecycle

/// The worker's operations endpoint: Prometheus metrics and health checks over HTTP.
///
/// - `GET /metrics`: every swift-metrics metric, in Prometheus text format.
/// - `GET /health/live`: 200 while the process serves HTTP.
/// - `GET /health/ready`: 200 when the worker is connected to RabbitMQ and PostgreSQL and consumes
///   every partition it serves (as active consumer or hot standby), 503 otherwise, with the details as JSON.
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
        host: String, port: Int, registry: PrometheusCollectorRegistry, readiness: @escaping @Sendable () -> WorkerReadiness, logger: Logger
    ) -> some Service {
        let router = Router()
        router.get("metrics") { _, _ -> Response in
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
            let missing = Set(state.partitions).subtracting(state.consuming).sorted()
            let body = """
                {"status":"\(state.isReady ? "ready" : "not_ready")","broker_connected":\(state.brokerConnected),\
                "database_connected":\(state.databaseConnected),"partitions":\(state.partitions.count),\
                "partitions_not_consumed":\(missing)}
                """
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

    /// Runs `worker` until SIGTERM or SIGINT (it then finishes its batch in hand and closes), with the
    /// operations endpoint on `host:port` beside it unless `port` is 0.
    public static func serve(_ worker: Worker, host: String, port: Int, logger: Logger) async throws {
        var services: [ServiceGroupConfiguration.ServiceConfiguration] = [.init(service: worker)]
        if port > 0 {
            let registry = bootstrapMetrics()
            services.append(.init(service: application(host: host, port: port, registry: registry, readiness: { worker.readiness }, logger: logger)))
        }
        let group = ServiceGroup(configuration: ServiceGroupConfiguration(services: services, gracefulShutdownSignals: [.sigterm, .sigint], logger: logger))
        try await group.run()
    }
}
