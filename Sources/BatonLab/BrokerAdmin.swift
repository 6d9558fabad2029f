import BatonAMQP
import BatonCore
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif

/// A client of RabbitMQ's management HTTP API (`rabbitmq_management`), for what AMQP cannot do:
/// virtual hosts, users and permissions. Scratch runs use it to work in a namespace of their own.
public struct BrokerAdmin: Sendable {
    /// The API's base URL, without credentials (e.g. `http://127.0.0.1:55673`).
    public let base: String
    private let user: String
    private let password: String

    /// The management API of the local services (scripts/services, docker-compose.yml).
    public static let defaultURL = "http://baton-admin:baton-admin@127.0.0.1:55673"

    /// Parses `http://user:password@host:port` (the password never appears in errors).
    public init(url text: String) throws {
        guard let components = URLComponents(string: text), let scheme = components.scheme, ["http", "https"].contains(scheme),
              let host = components.host, let user = components.user
        else {
            throw BrokerAdminError("management URL '\(Redaction.url(text))' must look like http://user:password@host:15672")
        }
        self.user = user
        self.password = components.password ?? ""
        base = "\(scheme)://\(host)\(components.port.map { ":\($0)" } ?? "")"
    }

    /// A name as one path segment of the API (`/` is `%2F`).
    static func segment(_ name: String) -> String {
        name.addingPercentEncoding(withAllowedCharacters: CharacterSet(charactersIn: "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~")) ?? name
    }

    @discardableResult
    private func send(_ method: String, _ path: String, json: Any? = nil, accept: Set<Int> = [200, 201, 204]) async throws -> Data {
        guard let url = URL(string: base + "/api/" + path) else { throw BrokerAdminError("bad management path \(path)") }
        var request = URLRequest(url: url, timeoutInterval: 15)
        request.httpMethod = method
        request.setValue("Basic " + Data("\(user):\(password)".utf8).base64EncodedString(), forHTTPHeaderField: "Authorization")
        if let json {
            request.setValue("application/json", forHTTPHeaderField: "Content-Type")
            request.httpBody = try JSONSerialization.data(withJSONObject: json)
        }
        let (data, response): (Data, URLResponse)
        do {
            (data, response) = try await URLSession.shared.data(for: request)
        } catch {
            throw BrokerAdminError("the RabbitMQ management API at \(base) does not answer (\(error.localizedDescription)): enable rabbitmq_management and pass its URL (BATON_BROKER_ADMIN_URL)")
        }
        let status = (response as? HTTPURLResponse)?.statusCode ?? 0
        guard accept.contains(status) else {
            throw BrokerAdminError("\(method) \(base)/api/\(path) answered \(status): \(String(decoding: data.prefix(300), as: UTF8.self))")
        }
        return data
    }

    /// Creates a virtual host (idempotent).
    public func createVirtualHost(_ name: String) async throws {
        try await send("PUT", "vhosts/\(Self.segment(name))", json: ["description": "baton scratch"])
    }

    /// Deletes a virtual host with everything in it (nothing when it does not exist).
    public func deleteVirtualHost(_ name: String) async throws {
        try await send("DELETE", "vhosts/\(Self.segment(name))", accept: [200, 204, 404])
    }

    /// The administrator's user name and password, for tools that log in with them (never print them).
    public var credentials: (user: String, password: String) { (user, password) }

    /// Messages published in `virtualHost` since it was made (`message_stats.publish`: requests, replies,
    /// events, ticks). The management plugin samples it every few seconds (`collect_statistics_interval`,
    /// 5 s by default), so read it after at least that long.
    public func publishedMessages(in virtualHost: String) async throws -> Int {
        let data = try await send("GET", "vhosts/\(Self.segment(virtualHost))")
        let object = (try JSONSerialization.jsonObject(with: data)) as? [String: Any]
        return ((object?["message_stats"] as? [String: Any])?["publish"] as? Int) ?? 0
    }

    /// Closes the connections of `virtualHost` whose client-given name (`connection_name`) is `name`, as a
    /// failing node would; returns how many. The management API lists a connection a moment after it opens.
    @discardableResult
    public func closeConnections(named name: String, in virtualHost: String) async throws -> Int {
        let data = try await send("GET", "vhosts/\(Self.segment(virtualHost))/connections?columns=name,client_properties.connection_name")
        let connections = ((try JSONSerialization.jsonObject(with: data)) as? [[String: Any]]) ?? []
        let matching = connections.filter { (($0["client_properties"] as? [String: Any])?["connection_name"] as? String) == name }.compactMap { $0["name"] as? String }
        for connection in matching {
            try await send("DELETE", "connections/\(Self.segment(connection))", accept: [200, 204, 404])
        }
        return matching.count
    }

    /// Sets the policy `name` of `virtualHost` on the queues whose names match `pattern` (a regular
    /// expression) to `definition` (for example `["max-length": 0, "overflow": "reject-publish"]`).
    public func setQueuePolicy(_ name: String, in virtualHost: String, pattern: String, definition: [String: Any]) async throws {
        try await send("PUT", "policies/\(Self.segment(virtualHost))/\(Self.segment(name))", json: [
            "pattern": pattern, "definition": definition, "apply-to": "queues", "priority": 0,
        ])
    }

    /// Removes the policy `name` of `virtualHost` (nothing when it does not exist).
    public func clearPolicy(_ name: String, in virtualHost: String) async throws {
        try await send("DELETE", "policies/\(Self.segment(virtualHost))/\(Self.segment(name))", accept: [200, 204, 404])
    }

    /// The names of every virtual host.
    public func virtualHosts() async throws -> [String] {
        let data = try await send("GET", "vhosts?columns=name")
        return ((try JSONSerialization.jsonObject(with: data)) as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
    }

    /// One user's permissions on one virtual host (regular expressions over resource names).
    public struct Permission: Sendable, Hashable {
        public var user: String
        public var configure: String
        public var write: String
        public var read: String

        public init(user: String, configure: String, write: String, read: String) {
            self.user = user
            self.configure = configure
            self.write = write
            self.read = read
        }
    }

    /// The permissions granted on `virtualHost`.
    public func permissions(in virtualHost: String) async throws -> [Permission] {
        let data = try await send("GET", "vhosts/\(Self.segment(virtualHost))/permissions")
        return ((try JSONSerialization.jsonObject(with: data)) as? [[String: Any]] ?? []).compactMap { entry in
            guard let user = entry["user"] as? String, let configure = entry["configure"] as? String,
                  let write = entry["write"] as? String, let read = entry["read"] as? String
            else { return nil }
            return Permission(user: user, configure: configure, write: write, read: read)
        }
    }

    /// Grants `permission` on `virtualHost`.
    public func grant(_ permission: Permission, on virtualHost: String) async throws {
        try await send("PUT", "permissions/\(Self.segment(virtualHost))/\(Self.segment(permission.user))", json: [
            "configure": permission.configure, "write": permission.write, "read": permission.read,
        ])
    }

    /// Creates (or updates) a user without tags.
    public func createUser(_ name: String, password: String) async throws {
        try await send("PUT", "users/\(Self.segment(name))", json: ["password": password, "tags": ""])
    }

    /// Deletes a user (nothing when it does not exist).
    public func deleteUser(_ name: String) async throws {
        try await send("DELETE", "users/\(Self.segment(name))", accept: [200, 204, 404])
    }

    /// Names of the users whose name starts with `prefix`.
    public func users(prefix: String) async throws -> [String] {
        let data = try await send("GET", "users?columns=name")
        return ((try JSONSerialization.jsonObject(with: data)) as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }.filter { $0.hasPrefix(prefix) }
    }
}

/// A failed management API call.
public struct BrokerAdminError: Error, Sendable, CustomStringConvertible {
    public let description: String
    init(_ description: String) { self.description = description }
}

/// A virtual host of its own for a scratch run (tests, bench, chaos): the same broker, the same users
/// with the same permissions as the deployment's virtual host, and none of the deployment's queues.
/// Delete it when done; a later scratch run on the same machine also deletes those whose process died.
public struct ScratchBroker: Sendable {
    /// The scratch virtual host.
    public let virtualHost: String
    /// The management API it was made with.
    public let admin: BrokerAdmin

    static let prefix = "baton-scratch-"

    /// Creates `baton-scratch-<purpose>-<host>-<pid>-<random>` and grants every user that has permissions
    /// on `deployment` the same ones there.
    public static func create(purpose: String, admin: BrokerAdmin, mirroring deployment: String = "/") async throws -> ScratchBroker {
        try await removeStale(admin: admin)
        let host = ProcessInfo.processInfo.hostName.filter { $0.isLetter || $0.isNumber || $0 == "-" }
        let name = "\(prefix)\(purpose)-\(host)-\(getpid())-\(String(UInt32.random(in: 0...UInt32.max), radix: 36))"
        try await admin.createVirtualHost(name)
        for permission in try await admin.permissions(in: deployment) {
            try await admin.grant(permission, on: name)
        }
        return ScratchBroker(virtualHost: name, admin: admin)
    }

    /// Runs `body` with a new scratch virtual host, deleted afterwards whatever happens.
    public static func with<T: Sendable>(purpose: String, admin: BrokerAdmin, _ body: (ScratchBroker) async throws -> T) async throws -> T {
        try await withClosing(try await create(purpose: purpose, admin: admin), close: { await $0.delete() }, body)
    }

    /// `url` (same user) pointed at the scratch virtual host.
    public func url(_ url: AMQPURL) -> AMQPURL {
        var url = url
        url.virtualHost = virtualHost
        return url
    }

    /// Deletes the virtual host and everything in it.
    public func delete() async {
        try? await admin.deleteVirtualHost(virtualHost)
    }

    /// Removes scratch virtual hosts of this machine whose process is gone.
    static func removeStale(admin: BrokerAdmin) async throws {
        let host = ProcessInfo.processInfo.hostName.filter { $0.isLetter || $0.isNumber || $0 == "-" }
        for name in try await admin.virtualHosts() where name.hasPrefix(prefix) {
            let parts = name.dropFirst(prefix.count).split(separator: "-")
            guard parts.count >= 3, let pid = Int32(parts[parts.count - 2]), name.contains("-\(host)-\(pid)-") else { continue }
            if kill(pid, 0) != 0, errno == ESRCH { try? await admin.deleteVirtualHost(name) }
        }
    }
}
