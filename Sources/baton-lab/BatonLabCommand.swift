import ArgumentParser
import BatonCommandLine
import BatonCore
import BatonLab
import BatonOperations

/// `baton-lab`: what measures and tries Baton rather than runs it: the benchmark, the chaos run, the
/// incident demo and the store benchmark. Each works in a namespace of its own (a scratch
/// database and virtual host) and starts the `baton` beside it as its workers. `baton bench`, `baton chaos`,
/// `baton demo` and `baton bench-store` run these commands when `baton-lab` is installed beside `baton`;
/// a deployment's image carries `baton` alone.
@main
struct BatonLabCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "baton-lab",
        abstract: "Baton's lab: benchmark, chaos run, incident demo, store benchmark. Scratch namespaces only.",
        discussion: """
            Exit codes: 0 success; 1 a failure (a chaos verdict of FAIL, a run that could not finish); 64 a usage error.
            """,
        version: BatonVersion.description,
        subcommands: [Bench.self, Chaos.self, Demo.self, BenchStore.self]
    )
}

/// Where scratch runs (bench, chaos) make their own virtual host: RabbitMQ's management API.
struct ScratchOptions: ParsableArguments {
    @Option(name: .customLong("broker-admin-url"), help: ArgumentHelp(
        "RabbitMQ management API with an administrator's credentials, to create the run's own virtual host (env BATON_BROKER_ADMIN_URL; default the local services' \(Redaction.url(BrokerAdmin.defaultURL))).",
        valueName: "url"
    ))
    var adminURLFlag: String?

    func admin() throws -> BrokerAdmin {
        try Setting.parse(adminURLFlag, "BATON_BROKER_ADMIN_URL", default: BrokerAdmin.defaultURL) { try BrokerAdmin(url: $0) }
    }

    func validate() throws {
        _ = try admin()
    }
}

