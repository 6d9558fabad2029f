import BatonCore
import Foundation

/// Where and how to connect to PostgreSQL, parsed from
/// `postgres://user:password@host:port/database?sslmode=...`.
///
/// The password never appears in ``description``: it prints as `********`.
public struct PostgresURL: Sendable, Hashable, CustomStringConvertible {
    /// Query parameters passed through to libpq, and what they mean there.
    public static let allowedParameters: [String] = [
        "sslmode", "sslrootcert", "sslcert", "sslkey", "application_name", "connect_timeout", "host",
    ]
    static let sslModes = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]

    /// The host name, address, or (with `?host=/dir`) a Unix socket folder.
    public var host: String
    /// The port.
    public var port: Int
    /// The user.
    public var user: String
    /// The password, if any. Never printed.
    public var password: String?
    /// The database.
    public var database: String
    /// libpq connection parameters from the query string (`sslmode` and friends).
    public var parameters: [String: String]

    /// Parses a `postgres://` or `postgresql://` URL.
    ///
    /// - Throws: ``PostgresError`` with code ``PostgresError/Code/invalidURL`` naming what is wrong
    ///   (with the password redacted).
    public init(_ text: String) throws(PostgresError) {
        let redacted = Self.redact(text)
        func invalid(_ reason: String) -> PostgresError {
            PostgresError(code: .invalidURL, message: "invalid database URL '\(redacted)': \(reason)")
        }
        guard let components = URLComponents(string: text) else {
            throw invalid("it must look like postgres://user:password@host:5432/database?sslmode=disable")
        }
        guard let scheme = components.scheme?.lowercased(), scheme == "postgres" || scheme == "postgresql" else {
            throw invalid("the scheme must be postgres:// or postgresql://")
        }
        var parameters: [String: String] = [:]
        for item in components.queryItems ?? [] {
            guard Self.allowedParameters.contains(item.name) else {
                throw invalid("parameter '\(item.name)' is not supported; use \(Self.allowedParameters.joined(separator: ", "))")
            }
            parameters[item.name] = item.value ?? ""
        }
        if let mode = parameters["sslmode"], !Self.sslModes.contains(mode) {
            throw invalid("sslmode '\(mode)' is not one of \(Self.sslModes.joined(separator: ", "))")
        }
        if let timeout = parameters["connect_timeout"], Int(timeout).map({ $0 >= 1 }) != true {
            throw invalid("connect_timeout '\(timeout)' must be a whole number of seconds, at least 1")
        }
        let host = components.host.map { $0.hasPrefix("[") ? String($0.dropFirst().dropLast()) : $0 } ?? ""
        guard !host.isEmpty || parameters["host"] != nil else {
            throw invalid("a host is required")
        }
        guard let user = components.user, !user.isEmpty else {
            throw invalid("a user is required (postgres://USER@host/database)")
        }
        let path = components.path
        let database = path.hasPrefix("/") ? String(path.dropFirst()) : path
        guard !database.isEmpty, !database.contains("/") else {
            throw invalid("a database name is required after the host (postgres://user@host/DATABASE)")
        }
        if let port = components.port, !(1...65535).contains(port) {
            throw invalid("port \(port) is not between 1 and 65535")
        }
        self.host = parameters.removeValue(forKey: "host") ?? host
        self.port = components.port ?? 5432
        self.user = user
        self.password = components.password
        self.database = database
        self.parameters = parameters
    }

    /// The URL with the password shown as `********`.
    public var description: String {
        render(password: password == nil ? nil : "********")
    }

    /// The URL with its password, to hand to a child process or a libpq tool. Never log it.
    public var connectionString: String {
        render(password: password)
    }

    private func render(password: String?) -> String {
        var components = URLComponents()
        components.scheme = "postgres"
        components.user = user
        components.password = password
        components.host = host.hasPrefix("/") ? nil : host
        components.port = port
        components.path = "/" + database
        var items = parameters.sorted { $0.key < $1.key }.map { URLQueryItem(name: $0.key, value: $0.value) }
        if host.hasPrefix("/") { items.append(URLQueryItem(name: "host", value: host)) }
        components.queryItems = items.isEmpty ? nil : items
        return components.string ?? "postgres://\(user)@\(host):\(port)/\(database)"
    }

    /// `text` with the password of any URL in it replaced by `********`; safe to print even when unparseable.
    public static func redact(_ text: String) -> String {
        Redaction.url(text)
    }
}
