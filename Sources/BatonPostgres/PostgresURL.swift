import BatonCore
import Foundation

/// Where and how to connect to PostgreSQL, parsed from
/// `postgres://user:password@host:port/database?sslmode=...`.
///
/// The password never appears in ``description``: it prints as `********`.
public struct PostgresURL: Sendable, Hashable, CustomStringConvertible {
    /// Query parameters passed through to libpq, and what they mean there.
    public static let allowedParameters: [String] = [
        "sslmode", "sslrootcert", "sslcert", "sslkey", "application_name", "connect_timeout", "host", "target_session_attrs",
    ]
    static let sslModes = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
    /// libpq's `target_session_attrs` (PostgreSQL 14's libpq and later): which of several hosts to keep.
    static let sessionAttributes = ["any", "read-write", "read-only", "primary", "standby", "prefer-standby"]

    /// A further server of a multi-host URL (`postgres://u@h1:5432,h2:5433/db`): libpq tries the hosts
    /// in order and keeps the first that answers and matches `target_session_attrs` (`read-write` finds
    /// the primary, so workers follow a promotion).
    public struct Endpoint: Sendable, Hashable {
        public var host: String
        public var port: Int

        public init(host: String, port: Int) {
            self.host = host
            self.port = port
        }
    }

    /// The servers after the first (``host``, ``port``), in order.
    public var alternates: [Endpoint] = []

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
        // libpq's multi-host form: the hosts after the first are split off here, the rest is one URL.
        var text = text
        var alternates: [Endpoint] = []
        if let schemeEnd = text.range(of: "://") {
            let authorityEnd = text[schemeEnd.upperBound...].firstIndex { $0 == "/" || $0 == "?" } ?? text.endIndex
            let authority = text[schemeEnd.upperBound..<authorityEnd]
            let hostsStart = authority.lastIndex(of: "@").map { text.index(after: $0) } ?? schemeEnd.upperBound
            let hosts = text[hostsStart..<authorityEnd].split(separator: ",", omittingEmptySubsequences: false)
            if hosts.count > 1 {
                for entry in hosts.dropFirst() {
                    guard let parsed = URLComponents(string: "postgres://" + entry), let host = parsed.host, !host.isEmpty,
                          parsed.user == nil, parsed.path.isEmpty
                    else { throw invalid("'\(entry)' is not a host or host:port in the host list") }
                    let port = parsed.port ?? 5432
                    guard (1...65535).contains(port) else { throw invalid("port \(port) is not between 1 and 65535") }
                    alternates.append(Endpoint(host: host.hasPrefix("[") ? String(host.dropFirst().dropLast()) : host, port: port))
                }
                text.replaceSubrange(hostsStart..<authorityEnd, with: hosts[0])
            }
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
        if let attributes = parameters["target_session_attrs"], !Self.sessionAttributes.contains(attributes) {
            throw invalid("target_session_attrs '\(attributes)' is not one of \(Self.sessionAttributes.joined(separator: ", "))")
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
        self.alternates = alternates
    }

    /// Every server, first to last: what libpq gets as its `host` and `port` lists.
    public var endpoints: [Endpoint] { [Endpoint(host: host, port: port)] + alternates }

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
        var text = components.string ?? "postgres://\(user)@\(host):\(port)/\(database)"
        // The user information is percent-encoded, so the first slash after the scheme starts the path.
        if !alternates.isEmpty, let scheme = text.range(of: "://"), let pathStart = text[scheme.upperBound...].firstIndex(of: "/") {
            // The further hosts follow the first, before the path: postgres://u@h1:5432,h2:5433/db.
            let list = alternates.map { ($0.host.contains(":") ? "[\($0.host)]" : $0.host) + ":\($0.port)" }.joined(separator: ",")
            text.insert(contentsOf: "," + list, at: pathStart)
        }
        return text
    }

    /// `text` with the password of any URL in it replaced by `********`; safe to print even when unparseable.
    public static func redact(_ text: String) -> String {
        Redaction.url(text)
    }
}
