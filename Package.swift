// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "baton",
    platforms: [.macOS(.v14)],
    products: [
        .library(name: "BatonCore", targets: ["BatonCore"]),
        .library(name: "BatonPostgres", targets: ["BatonPostgres"]),
        .executable(name: "baton", targets: ["baton"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser.git", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log.git", from: "1.16.2"),
        .package(url: "https://github.com/x-sheep/swift-property-based.git", from: "2.0.1"),
    ],
    targets: [
        // System library over libpq (Debian: libpq-dev, Homebrew: libpq).
        .systemLibrary(
            name: "CLibPQ",
            pkgConfig: "libpq",
            providers: [.apt(["libpq-dev"]), .brew(["libpq"])]
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
            ]
        ),
        .executableTarget(
            name: "baton",
            dependencies: [
                "BatonCore",
                "BatonPostgres",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
        .testTarget(
            name: "BatonCoreTests",
            dependencies: [
                "BatonCore",
                .product(name: "PropertyBased", package: "swift-property-based"),
            ]
        ),
        .testTarget(
            name: "BatonPostgresTests",
            dependencies: ["BatonPostgres"]
        ),
        // Needs a real PostgreSQL (scripts/services up). With CI set, a missing service fails.
        .testTarget(
            name: "IntegrationTests",
            dependencies: [
                "BatonCore",
                "BatonPostgres",
                .product(name: "Logging", package: "swift-log"),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)
