// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "baton",
    products: [
        .library(name: "BatonCore", targets: ["BatonCore"]),
        .library(name: "BatonPostgres", targets: ["BatonPostgres"]),
        .library(name: "BatonAMQP", targets: ["BatonAMQP"]),
        .library(name: "BatonWorker", targets: ["BatonWorker"]),
        .library(name: "BatonClient", targets: ["BatonClient"]),
        .library(name: "BatonLab", targets: ["BatonLab"]),
        .executable(name: "baton", targets: ["baton"]),
        .executable(name: "baton-lab", targets: ["baton-lab"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-collections.git", from: "1.6.0"),
        .package(url: "https://github.com/x-sheep/swift-property-based.git", from: "2.0.1"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle.git", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-metrics.git", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus.git", from: "2.4.1"),
        .package(url: "https://github.com/hummingbird-project/hummingbird.git", from: "2.28.1"),
    ],
    targets: [
        // System library over libpq (Debian: libpq-dev, Homebrew: libpq).
        .systemLibrary(
            name: "CLibPQ",
            pkgConfig: "libpq",
            providers: [.apt(["libpq-dev"]), .brew(["libpq"])]
        ),
        // System library over rabbitmq-c (Debian: librabbitmq-dev, Homebrew: rabbitmq-c).
        .systemLibrary(
            name: "CRabbitMQ",
            pkgConfig: "librabbitmq",
            providers: [.apt(["librabbitmq-dev"]), .brew(["rabbitmq-c"])]
        ),
        // Pure Swift: protocol, codec, partitioner, decision state machine. No I/O, no C.
        .target(name: "BatonCore"),
        // libpq wrapper and the fenced ownership store.
        .target(
            name: "BatonPostgres",
            dependencies: [
                "CLibPQ",
                "BatonCore",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "HeapModule", package: "swift-collections"),
            ]
        ),
        // rabbitmq-c wrapper: one I/O thread per connection, channels, confirms, consume, reconnect helpers.
        .target(
            name: "BatonAMQP",
            dependencies: [
                "CRabbitMQ",
                "BatonCore",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The partition worker: consume in batches, decide through the store, reply, publish events, ack.
        .target(
            name: "BatonWorker",
            dependencies: [
                "BatonCore",
                "BatonPostgres",
                "BatonAMQP",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ]
        ),
        // Operations: Prometheus metrics and health endpoints over HTTP (hummingbird), and the log formats.
        .target(
            name: "BatonOperations",
            dependencies: [
                "BatonWorker",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "Prometheus", package: "swift-prometheus"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
            ],
            // `baton --version` and `baton_build_info`: the git commit and build date (BatonVersion).
            plugins: [.plugin(name: "BuildInfoPlugin")]
        ),
        // What a frontend links: typed claim/renew/release/inspect/releaseConnection over AMQP RPC.
        .target(
            name: "BatonClient",
            dependencies: [
                "BatonCore",
                "BatonAMQP",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Baton's lab: what the bench, the chaos run, the demo and the integration tests share, as
        // hummingbird ships HummingbirdTesting: scratch deployments (database, migration, topology, a virtual
        // host of their own), worker child processes that die with their parent, the workloads and systems of
        // the bench, the chaos run, the incident race and the history checkers. Linked by `baton-lab` and the
        // tests, never by `baton` (a deployment's worker and commands) or a frontend.
        .target(
            name: "BatonLab",
            dependencies: [
                "BatonCore",
                "BatonAMQP",
                "BatonPostgres",
                "BatonWorker",
                "BatonClient",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // The command line's shared settings: flag, then environment, then default (``Setting``), and the
        // option groups of the database, the broker and the logs.
        .target(
            name: "BatonCommandLine",
            dependencies: [
                "BatonCore", "BatonPostgres", "BatonAMQP", "BatonOperations",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // `baton`: the worker, migrate, topology, status, prune and the request commands; what a deployment runs.
        .executableTarget(
            name: "baton",
            dependencies: [
                "BatonCore", "BatonPostgres", "BatonAMQP", "BatonWorker", "BatonClient", "BatonOperations", "BatonCommandLine",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // `baton-lab`: bench, chaos, demo, bench-store (`baton bench` runs it when it is beside `baton`).
        .executableTarget(
            name: "baton-lab",
            dependencies: [
                "BatonCore", "BatonLab", "BatonOperations", "BatonCommandLine",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .plugin(name: "BuildInfoPlugin", capability: .buildTool()),
        // examples/: a collab server's ownership with the resource-side fencing check (README, "Why
        // Baton, and when not"); IntegrationTests run it against a worker.
        .executableTarget(
            name: "collab-server-example",
            dependencies: ["BatonClient", "BatonCore", "BatonAMQP"],
            path: "examples/swift"
        ),
        .testTarget(
            name: "BatonCoreTests",
            dependencies: [
                "BatonCore",
                // The history checker, the decisions' oracle in the property tests (pure).
                "BatonLab",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ]
        ),
        .testTarget(
            name: "BatonPostgresTests",
            dependencies: ["BatonPostgres"]
        ),
        .testTarget(
            name: "BatonAMQPTests",
            dependencies: ["BatonAMQP"]
        ),
        // The chaos checker and the chaos run's recovery times: pure.
        .testTarget(
            name: "BatonLabTests",
            dependencies: ["BatonLab", "BatonCore"]
        ),
        // The client's coalescing lanes: pure, no broker.
        .testTarget(
            name: "BatonClientTests",
            dependencies: ["BatonClient", "BatonCore"]
        ),
        // The worker's partition state machine and deferred ack: pure, no broker or database.
        .testTarget(
            name: "BatonWorkerTests",
            dependencies: [
                "BatonWorker",
                "BatonAMQP",
                "BatonCore",
                "BatonPostgres",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        // Needs a real PostgreSQL (scripts/services up). With CI set, a missing service fails.
        .testTarget(
            name: "IntegrationTests",
            dependencies: [
                "BatonLab",
                "BatonCore",
                "BatonPostgres",
                "BatonAMQP",
                "BatonWorker",
                "BatonClient",
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
