import BatonCore
import Logging
import Synchronization
#if canImport(Glibc)
import Glibc
#endif

/// How the command line writes its logs (`--log-format`, `BATON_LOG_FORMAT`): both go to standard error.
public enum LogFormat: String, CaseIterable, Sendable {
    /// One line of text per entry, values quoted where needed (``TextLogHandler``):
    /// `2026-11-28T00:57:02.306Z info baton.worker: key=value other="a b" [Module] message`.
    case text
    /// One JSON object per line (``JSONLogHandler``).
    case json

    /// The format that `text` names (in any case); the error names the value and what is allowed.
    public init(parsing text: String) throws(InvalidSetting) {
        guard let format = LogFormat(rawValue: text.lowercased()) else {
            throw InvalidSetting(description: "log format '\(text)' is not allowed: use \(Self.allCases.map(\.rawValue).joined(separator: " or "))")
        }
        self = format
    }

    private static let bootstrapped = Mutex(false)

    /// Makes every logger of the process, the command's and the libraries' alike, write in this format
    /// at `level`. swift-log allows one bootstrap per process: calls after the first do nothing.
    public func bootstrap(level: Logger.Level) {
        let first = Self.bootstrapped.withLock { done in
            defer { done = true }
            return !done
        }
        guard first else { return }
        switch self {
        case .text:
            LoggingSystem.bootstrap { label in
                var handler = LineLogHandler(label: label, format: .text)
                handler.logLevel = level
                return handler
            }
        case .json:
            LoggingSystem.bootstrap { label in
                var handler = LineLogHandler(label: label, format: .json)
                handler.logLevel = level
                return handler
            }
        }
    }
}

/// A setting whose value is not allowed; the description names the value and what is allowed.
public struct InvalidSetting: Error, CustomStringConvertible {
    public let description: String
}

/// The JSON log format (``LineLogHandler`` with ``LogFormat/json``): each entry one JSON object on a
/// line of its own, to standard error (where the text format writes too):
///
/// ```json
/// {"ts":"2026-11-28T00:57:02.306Z","level":"info","label":"baton.migrate","message":"applied migration","source":"BatonPostgres","metadata":{"baton.migration":"1 ownership store"}}
/// ```
///
/// - `ts`: the wall clock, ISO 8601 in UTC with milliseconds.
/// - `level`: swift-log's level name (`trace` ... `critical`); `label`: the logger's label; `source`: the module.
/// - `metadata`: always an object, its values always strings, written as the text format writes them.
///   Nested metadata is flattened into dotted keys: `["peer": ["host": "a"]]` becomes `"peer.host":"a"`, an
///   array's elements `"key.0"`, `"key.1"`; an empty dictionary or array keeps its key with `"[:]"` or `"[]"`.
///   An error logged with the entry adds `error.message` and `error.type`, as `StreamLogHandler` does.
///
/// Strings are JSON-escaped (quotes, backslashes, every control character); other characters stay
/// as UTF-8. The handler prints messages and values exactly as the text format does, so what is
/// redacted there is redacted here: URLs describe themselves with their password as `********`.
public enum JSONLogHandler {
    /// One entry as a line: the JSON object and `\n`.
    static func line(at time: Timestamp, level: Logger.Level, label: String, message: String, source: String, metadata: Logger.Metadata) -> [UInt8] {
        var bytes: [UInt8] = []
        bytes.reserveCapacity(160 + message.utf8.count)
        func field(_ name: String, _ value: String) {
            bytes.append(bytes.isEmpty ? UInt8(ascii: "{") : UInt8(ascii: ","))
            JSONText.appendString(name, to: &bytes)
            bytes.append(UInt8(ascii: ":"))
            JSONText.appendString(value, to: &bytes)
        }
        field("ts", time.rfc3339)
        field("level", level.rawValue)
        field("label", label)
        field("message", message)
        field("source", source)
        bytes += #","metadata":{"#.utf8
        for (index, entry) in flatten(metadata).enumerated() {
            if index > 0 { bytes.append(UInt8(ascii: ",")) }
            JSONText.appendString(entry.key, to: &bytes)
            bytes.append(UInt8(ascii: ":"))
            JSONText.appendString(entry.value, to: &bytes)
        }
        bytes += "}}\n".utf8
        return bytes
    }

    /// `metadata` as string pairs sorted by key, nested dictionaries and arrays flattened into dotted keys.
    static func flatten(_ metadata: Logger.Metadata) -> [(key: String, value: String)] {
        var flat: [String: String] = [:]
        func add(_ key: String, _ value: Logger.MetadataValue) {
            switch value {
            case .string(let text):
                flat[key] = text
            case .stringConvertible(let convertible):
                flat[key] = convertible.description
            case .dictionary(let entries):
                if entries.isEmpty { flat[key] = value.description }
                for (name, nested) in entries { add("\(key).\(name)", nested) }
            case .array(let items):
                if items.isEmpty { flat[key] = value.description }
                for (index, item) in items.enumerated() { add("\(key).\(index)", item) }
            }
        }
        for (key, value) in metadata { add(key, value) }
        return flat.sorted { $0.key < $1.key }.map { (key: $0.key, value: $0.value) }
    }

    /// The wall clock in milliseconds.
    static func now() -> Timestamp {
        var time = timespec()
        clock_gettime(CLOCK_REALTIME, &time)
        return Timestamp(milliseconds: Int64(time.tv_sec) * 1000 + Int64(time.tv_nsec) / 1_000_000)
    }
}

/// The swift-log handler of both formats: merges an entry's metadata as `StreamLogHandler` does (the
/// handler's, the provider's, the entry's, and an error as `error.message` and `error.type`) and writes
/// it as one line of ``LogFormat`` (``JSONLogHandler`` or ``TextLogHandler``).
public struct LineLogHandler: LogHandler {
    /// The logger's label.
    public let label: String
    /// The line format.
    public let format: LogFormat
    public var logLevel: Logger.Level = .info
    public var metadata: Logger.Metadata = [:]
    public var metadataProvider: Logger.MetadataProvider?
    private let output: @Sendable ([UInt8]) -> Void

    /// A handler writing to `output` (default: standard error, one whole line per write).
    public init(
        label: String, format: LogFormat, metadataProvider: Logger.MetadataProvider? = LoggingSystem.metadataProvider,
        output: @escaping @Sendable ([UInt8]) -> Void = { StandardError.write($0) }
    ) {
        self.label = label
        self.format = format
        self.metadataProvider = metadataProvider
        self.output = output
    }

    public subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }

    public func log(event: LogEvent) {
        var merged = metadata
        if let provided = metadataProvider?.get(), !provided.isEmpty { merged.merge(provided) { $1 } }
        if let explicit = event.metadata, !explicit.isEmpty { merged.merge(explicit) { $1 } }
        if let error = event.error {
            merged["error.message"] = "\(error)"
            merged["error.type"] = "\(String(reflecting: type(of: error)))"
        }
        let time = JSONLogHandler.now()
        let message = event.message.description
        let line = switch format {
        case .json: JSONLogHandler.line(at: time, level: event.level, label: label, message: message, source: event.source, metadata: merged)
        case .text: TextLogHandler.line(at: time, level: event.level, label: label, message: message, source: event.source, metadata: merged)
        }
        output(line)
    }
}

/// Standard error, written a whole line at a time so that lines from several threads never interleave.
public enum StandardError {
    private static let lock = Mutex(())

    /// Writes `bytes` to file descriptor 2, retrying short writes; gives up silently if it is closed.
    public static func write(_ bytes: [UInt8]) {
        lock.withLock { _ in
            bytes.withUnsafeBytes { buffer in
                guard let base = buffer.baseAddress else { return }
                var offset = 0
                while offset < buffer.count {
                    let written = Glibc.write(2, base + offset, buffer.count - offset)
                    if written < 0 {
                        if errno == EINTR { continue }
                        return
                    }
                    offset += written
                }
            }
        }
    }
}
