import BatonCore
import Foundation

/// Where and how to connect to RabbitMQ, parsed from an `amqp://` or `amqps://` URL.
///
/// `amqp://user:password@host:5672/vhost?heartbeat=10&connection_timeout=5000`; `amqps://` adds TLS
/// with peer and host name verification, and accepts `cacertfile`, `certfile`, `keyfile` and
/// `verify=verify_none`. The password never appears in ``description``.
public struct AMQPURL: Sendable, Hashable, CustomStringConvertible {
    /// Query parameters understood.
    public static let allowedParameters = ["heartbeat", "connection_timeout", "cacertfile", "certfile", "keyfile", "verify", "channel_max", "frame_max"]

    /// True for `amqps://`.
    public var tls: Bool
    /// Host name or address.
    public var host: String
    /// Port (5672, or 5671 for TLS, by default).
    public var port: Int
    /// User (default `guest`).
    public var user: String
    /// Password (default `guest`). Never printed.
    public var password: String
    /// Virtual host (default `/`).
    public var virtualHost: String
    /// Heartbeat interval in seconds, 0 for none (default 10).
    public var heartbeatSeconds: Int
    /// Bound on connecting, the handshake and every synchronous broker call (default 5000 ms).
    public var connectionTimeoutMilliseconds: Int
    /// TLS: the CA certificates file to verify the broker with.
    public var caCertificateFile: String?
    /// TLS: a client certificate file (PEM), with ``keyFile``.
    public var certificateFile: String?
    /// TLS: the client certificate's key file (PEM).
    public var keyFile: String?
    /// TLS: verify the broker's certificate and host name (default true; `verify=verify_none` turns it off).
    public var verifyPeer: Bool

    /// Parses a comma-separated list of AMQP URLs, one per broker node (`amqp://u:p@n1:5672/%2F,amqp://u:p@n2:5672/%2F`).
    /// A comma inside a URL (in a password) must be percent-encoded (`%2C`).
    public static func list(_ text: String) throws(AMQPError) -> [AMQPURL] {
        var urls: [AMQPURL] = []
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            urls.append(try AMQPURL(String(part).trimmingCharacters(in: .whitespaces)))
        }
        return urls
    }

    /// Parses an AMQP URL.
    public init(_ text: String) throws(AMQPError) {
        let redacted = Self.redact(text)
        func invalid(_ reason: String) -> AMQPError {
            AMQPError(code: .invalidURL, message: "invalid AMQP URL '\(redacted)': \(reason)")
        }
        guard let components = URLComponents(string: text), let scheme = components.scheme?.lowercased() else {
            throw invalid("it must look like amqp://user:password@host:5672/vhost")
        }
        guard scheme == "amqp" || scheme == "amqps" else { throw invalid("the scheme must be amqp:// or amqps://") }
        tls = scheme == "amqps"
        guard let host = components.host, !host.isEmpty else { throw invalid("a host is required") }
        self.host = host.hasPrefix("[") ? String(host.dropFirst().dropLast()) : host
        port = components.port ?? (tls ? 5671 : 5672)
        guard (1...65535).contains(port) else { throw invalid("port \(port) is not between 1 and 65535") }
        user = components.user ?? "guest"
        password = components.password ?? "guest"
        let path = components.path
        let vhost = path.hasPrefix("/") ? String(path.dropFirst()) : path
        virtualHost = vhost.isEmpty ? "/" : vhost
        heartbeatSeconds = 10
        connectionTimeoutMilliseconds = 5000
        verifyPeer = true
        for item in components.queryItems ?? [] {
            let value = item.value ?? ""
            switch item.name {
            case "heartbeat":
                guard let seconds = Int(value), (0...3600).contains(seconds) else { throw invalid("heartbeat '\(value)' must be 0 to 3600 seconds") }
                heartbeatSeconds = seconds
            case "connection_timeout":
                guard let ms = Int(value), (100...600_000).contains(ms) else { throw invalid("connection_timeout '\(value)' must be 100 to 600000 milliseconds") }
                connectionTimeoutMilliseconds = ms
            case "cacertfile": caCertificateFile = value
            case "certfile": certificateFile = value
            case "keyfile": keyFile = value
            case "verify":
                guard value == "verify_peer" || value == "verify_none" else { throw invalid("verify '\(value)' must be verify_peer or verify_none") }
                verifyPeer = value == "verify_peer"
            case "channel_max", "frame_max":
                continue
            default:
                throw invalid("parameter '\(item.name)' is not supported; use \(Self.allowedParameters.joined(separator: ", "))")
            }
        }
        if (certificateFile == nil) != (keyFile == nil) { throw invalid("certfile and keyfile go together") }
        if !tls, caCertificateFile != nil || certificateFile != nil { throw invalid("cacertfile, certfile and keyfile need amqps://") }
    }

    /// The URL with the password shown as `********`.
    public var description: String {
        var components = URLComponents()
        components.scheme = tls ? "amqps" : "amqp"
        components.user = user
        components.password = "********"
        components.host = host
        components.port = port
        components.percentEncodedPath = "/" + (virtualHost.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? virtualHost)
        return components.string ?? "\(tls ? "amqps" : "amqp")://\(user):********@\(host):\(port)"
    }

    /// The URL with its password, to hand to a child process. Never log it.
    public var connectionString: String {
        var components = URLComponents()
        components.scheme = tls ? "amqps" : "amqp"
        components.user = user
        components.password = password
        components.host = host
        components.port = port
        components.percentEncodedPath = "/" + (virtualHost.addingPercentEncoding(withAllowedCharacters: .alphanumerics) ?? virtualHost)
        var items = [URLQueryItem(name: "heartbeat", value: String(heartbeatSeconds)), URLQueryItem(name: "connection_timeout", value: String(connectionTimeoutMilliseconds))]
        if let caCertificateFile { items.append(URLQueryItem(name: "cacertfile", value: caCertificateFile)) }
        if let certificateFile { items.append(URLQueryItem(name: "certfile", value: certificateFile)) }
        if let keyFile { items.append(URLQueryItem(name: "keyfile", value: keyFile)) }
        if tls && !verifyPeer { items.append(URLQueryItem(name: "verify", value: "verify_none")) }
        components.queryItems = items
        return components.string ?? ""
    }

    /// `text` with the password of any URL in it replaced by `********`; safe on unparseable text.
    public static func redact(_ text: String) -> String {
        Redaction.url(text)
    }
}
