import ArgumentParser
import BatonAMQP
import BatonCore
import BatonOperations
import BatonPostgres
import Logging

/// How a command logs: level and format, for its own logger and the libraries'. Part of ``DatabaseOptions``,
/// so every command that logs has them.
public struct LogOptions: ParsableArguments {
    public init() {}

    @Option(name: .customLong("log-level"), help: ArgumentHelp(
        "trace, debug, info, notice, warning, error or critical (env BATON_LOG_LEVEL; default info).",
        valueName: "level"
    ))
    var logLevelFlag: String?

    @Option(name: .customLong("log-format"), help: ArgumentHelp(
        "text, or json for one JSON object per line (ts, level, label, message, source, metadata); either goes to standard error (env BATON_LOG_FORMAT; default text).",
        valueName: "format"
    ))
    var logFormatFlag: String?

    public func logLevel() throws -> Logger.Level {
        let raw = Setting.text(logLevelFlag, "BATON_LOG_LEVEL", default: "info")
        guard let level = Logger.Level(rawValue: raw.lowercased()) else {
            throw ValidationError("log level '\(raw)' is not one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        return level
    }

    public func logFormat() throws -> LogFormat {
        try Setting.parse(logFormatFlag, "BATON_LOG_FORMAT", default: LogFormat.text.rawValue) { try LogFormat(parsing: $0) }
    }

    /// A logger at the configured level. The first call makes every logger of the process, the libraries'
    /// too, write in the configured format at that level (swift-log's bootstrap, once per process).
    public func logger(_ label: String) throws -> Logger {
        let level = try logLevel()
        try logFormat().bootstrap(level: level)
        var logger = Logger(label: label)
        logger.logLevel = level
        return logger
    }

    public func validate() throws {
        _ = try logLevel()
        _ = try logFormat()
    }
}

/// Settings every command that talks to PostgreSQL shares. Flag first, then environment, then default.
public struct DatabaseOptions: ParsableArguments {
    public init() {}

    public static let defaultDatabaseURL = "postgres://baton:baton@127.0.0.1:55432/baton?sslmode=disable"

    @Option(name: .customLong("database-url"), help: ArgumentHelp(
        "PostgreSQL URL (env BATON_DATABASE_URL; default \(PostgresURL.redact(defaultDatabaseURL))).",
        valueName: "url"
    ))
    var databaseURLFlag: String?

    @Option(name: .customLong("partition-count"), help: ArgumentHelp(
        "Partition count N of the deployment, 1-1024; fixed once migrated (env BATON_PARTITION_COUNT; default 16).",
        valueName: "n"
    ))
    var partitionCountFlag: Int?

    @OptionGroup public var log: LogOptions

    public func databaseURL() throws -> PostgresURL {
        try Setting.parse(databaseURLFlag, "BATON_DATABASE_URL", default: Self.defaultDatabaseURL) { try PostgresURL($0) }
    }

    public func partitioner() throws -> Partitioner {
        try Partitioner(count: Setting.integer(partitionCountFlag, "BATON_PARTITION_COUNT", default: Partitioner.defaultCount, range: 1...1024, name: "partition count"))
    }

    /// A logger at the configured level (``LogOptions/logger(_:)``).
    public func logger(_ label: String) throws -> Logger {
        try log.logger(label)
    }

    public func validate() throws {
        _ = try databaseURL()
        _ = try partitioner()
    }

    /// Runs `body` with a connection to the database, closed afterwards whatever happens.
    public func withConnection<T>(_ logger: Logger, application: String, _ body: (PostgresConnection) async throws -> T) async throws -> T {
        try await PostgresConnection.withConnection(to: try databaseURL(), options: PostgresConnectionOptions(applicationName: application), logger: logger, body)
    }
}

/// Settings of commands that talk to RabbitMQ. Flag first, then the role's environment variable, then
/// the local services' default for that role.
public struct BrokerOptions: ParsableArguments {
    public init() {}

    @Option(name: .customLong("amqp-url"), help: ArgumentHelp(
        "RabbitMQ URL, amqp:// or amqps://, or several comma-separated (the nodes of a cluster, tried in order), as the broker user of this command's role (env BATON_AMQP_URL for workers, BATON_FRONTEND_AMQP_URL for client commands, BATON_OPERATOR_AMQP_URL for force-release; defaults: the local services' users).",
        valueName: "url"
    ))
    var amqpURLFlag: String?

    /// The URL for `role`.
    public func amqpURL(_ role: BrokerRole = .worker) throws -> AMQPURL {
        try amqpURLs(role)[0]
    }

    /// Every node of the broker for `role`: the setting may list several URLs, comma-separated.
    public func amqpURLs(_ role: BrokerRole = .worker) throws -> [AMQPURL] {
        try Setting.parse(amqpURLFlag, role.variable, default: role.defaultURL) { try AMQPURL.list($0) }
    }

    /// The URL for `role` from the environment or the default, never the flag (runs that need several roles).
    public static func environmentURL(_ role: BrokerRole) throws -> AMQPURL {
        try environmentURLs(role)[0]
    }

    /// Every node for `role` from the environment or the default, never the flag.
    public static func environmentURLs(_ role: BrokerRole) throws -> [AMQPURL] {
        try Setting.parse(nil, role.variable, default: role.defaultURL) { try AMQPURL.list($0) }
    }

    /// Checks the flag, which every role shares; the environment variable of the command's role is checked
    /// when the command reads it (a client command never fails on a worker's `BATON_AMQP_URL`).
    public func validate() throws {
        if amqpURLFlag != nil { _ = try amqpURLs() }  // the flag wins over every role's variable
    }
}
