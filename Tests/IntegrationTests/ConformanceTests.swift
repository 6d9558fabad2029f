import BatonCore
import BatonAMQP
@testable import BatonCore
import Foundation
import Testing

/// Replays every case of docs/conformance/vectors.json against a live worker, published by hand as
/// docs/conformance/README.md says (the Python client's tests replay the same file).
@Suite struct ConformanceTests {
    static let vectorsURL = Deployment.repositoryRoot.appendingPathComponent("docs/conformance/vectors.json")

    @Test func everyVectorPassesAgainstALiveWorker() async throws {
        let document = try JSONParser.parse(Array(try Data(contentsOf: Self.vectorsURL)))
        guard case .object(let root) = document, case .array(let cases)? = root["cases"] else {
            throw TestFailure("docs/conformance/vectors.json has no 'cases' array")
        }
        #expect({ if case .integer(let revision)? = root["revision"] { revision <= Int64(ProtocolV1.revision) } else { false } }(), "the vectors are for a revision this worker speaks")
        #expect(cases.count >= 20, "the suite covers the protocol (\(cases.count) cases)")
        let partitions = 4
        let deployment = try await Deployment.make(partitions: partitions)
        let worker = deployment.startWorker()
        let connection = try await deployment.connect("conformance", as: deployment.frontendURL)
        let channel = try await connection.openChannel()
        let (_, replies) = try await channel.consume(queue: ProtocolV1.directReplyTo, noAck: true)
        let run = UUID().uuidString.prefix(8).lowercased()
        var passed = 0
        // Every reply read, by correlation id: a `later` step's answer comes while other steps wait.
        var received: [String: JSONValue] = [:]
        func awaitReply(_ correlationID: String, until deadline: ContinuousClock.Instant) async throws -> JSONValue? {
            while received[correlationID] == nil, ContinuousClock.now < deadline {
                for message in try await replies.next(max: 16, timeout: .milliseconds(100)) {
                    if let id = message.properties.correlationID { received[id] = (try? JSONParser.parse(message.body)) ?? .null }
                }
            }
            return received[correlationID]
        }
        for (index, item) in cases.enumerated() {
            guard case .object(let testCase) = item, case .string(let name)? = testCase["name"], case .array(let steps)? = testCase["steps"] else {
                Issue.record("case \(index) is not an object with 'name' and 'steps'")
                continue
            }
            let names = Placeholders(prefix: "conformance/\(run)/\(index)", connectionPrefix: "conn-\(run)-\(index)")
            var failures: [String] = []
            var waiting: [String: (correlationID: String, route: Int)] = [:]  // `later` steps by name
            for (number, stepValue) in Self.expanded(steps).enumerated() {
                guard case .object(let step) = stepValue else { failures.append("step \(number) is not an object"); break }
                if case .string(let name)? = step["answer"] {
                    // The answer to an earlier `later` step.
                    guard let earlier = waiting[name] else { failures.append("step \(number): no earlier step is 'later': '\(name)'"); break }
                    guard let reply = try await awaitReply(earlier.correlationID, until: .now + .seconds(10)) else {
                        failures.append("step \(number): no answer to '\(name)' within 10 s")
                        break
                    }
                    var problems: [String] = []
                    Self.match(names.substitute(step["expect"] ?? .object([:])), reply, path: "$", route: earlier.route, partitions: partitions, problems: &problems)
                    if !problems.isEmpty {
                        failures.append("step \(number): \(problems.joined(separator: "; ")) in \(Self.encode(reply))")
                        break
                    }
                    continue
                }
                let body: [UInt8]
                let sent: JSONValue?
                if let value = step["send"] {
                    let substituted = names.substitute(value)
                    sent = substituted
                    body = Array(Self.encode(substituted).utf8)
                } else if case .string(let raw)? = step["send_raw"] {
                    body = Array(names.substitute(.string(raw)).stringValue!.utf8)
                    sent = try? JSONParser.parse(body)
                } else {
                    failures.append("step \(number) has neither 'send' nor 'send_raw'")
                    break
                }
                let route: Int = switch step["route"] {
                case .integer(let value)?: Int(value)
                default: Self.buffer(of: sent).map(deployment.partitioner.partition(of:)) ?? 0
                }
                let userID: String? = step["user_id"] == .bool(false) ? nil : deployment.frontendURL.user
                let correlationID = "\(run)-\(index)-\(number)"
                try await channel.publish(OutgoingMessage(
                    exchange: ProtocolV1.requestsExchange, routingKey: String(route), body: body,
                    properties: AMQPProperties(
                        contentType: ProtocolV1.contentType, correlationID: correlationID, replyTo: ProtocolV1.directReplyTo, deliveryMode: 2, userID: userID
                    ),
                    mandatory: true
                ))
                if case .string(let name)? = step["later"] {
                    // It waits in line: no reply now (none within 300 ms); its answer is a later step's.
                    if let early = try await awaitReply(correlationID, until: .now + .milliseconds(300)) {
                        failures.append("step \(number): answered at once, it should wait in line: \(Self.encode(early))")
                        break
                    }
                    waiting[name] = (correlationID, route)
                    continue
                }
                guard let reply = try await awaitReply(correlationID, until: .now + .seconds(10)) else {
                    failures.append("step \(number): no reply within 10 s")
                    break
                }
                if let expect = step["expect"] {
                    var problems: [String] = []
                    Self.match(names.substitute(expect), reply, path: "$", route: route, partitions: partitions, problems: &problems)
                    if !problems.isEmpty {
                        failures.append("step \(number): \(problems.joined(separator: "; ")) in \(Self.encode(reply))")
                        break
                    }
                }
            }
            if failures.isEmpty {
                passed += 1
            } else {
                Issue.record("conformance case \(index) '\(name)': \(failures.joined(separator: " | "))")
            }
        }
        #expect(passed == cases.count, "\(passed) of \(cases.count) cases passed")
        await connection.close()
        await worker.stop()
    }

    /// The buffer a step routes by: the request's, or the first batch element's that has one.
    /// The steps with each `repeat: N` step as N steps, `{n}` in its strings the 0-based repetition
    /// (docs/conformance/README.md).
    static func expanded(_ steps: [JSONValue]) -> [JSONValue] {
        steps.flatMap { step -> [JSONValue] in
            guard case .object(var fields) = step, case .integer(let times)? = fields.removeValue(forKey: "repeat") else { return [step] }
            return (0..<Int(times)).map { withIndex(.object(fields), $0) }
        }
    }

    /// `value` with `{n}` replaced by `index` in every string.
    static func withIndex(_ value: JSONValue, _ index: Int) -> JSONValue {
        switch value {
        case .string(let text): .string(text.replacingOccurrences(of: "{n}", with: String(index)))
        case .array(let items): .array(items.map { withIndex($0, index) })
        case .object(let fields): .object(Dictionary(uniqueKeysWithValues: fields.map { (withIndex(.string($0.key), index).stringValue ?? $0.key, withIndex($0.value, index)) }))
        default: value
        }
    }

    static func buffer(of value: JSONValue?) -> String? {
        guard case .object(let object)? = value else { return nil }
        if case .string(let buffer)? = object["buffer"] { return buffer }
        if case .array(let elements)? = object["batch"] { return elements.lazy.compactMap { buffer(of: $0) }.first }
        return nil
    }

    /// `expect` as a subset of `actual`, with the README's matchers.
    static func match(_ expect: JSONValue, _ actual: JSONValue?, path: String, route: Int, partitions: Int, problems: inout [String]) {
        if case .string(let text) = expect, text.hasPrefix("@") {
            let ok: Bool
            switch (text, actual) {
            case ("@absent", let value): ok = value == nil
            case ("@any", let value): ok = value != nil
            case ("@timestamp", .string(let value)?): ok = Timestamp(rfc3339: value) != nil && value.utf8.count == 24
            case ("@integer", .integer?): ok = true
            case ("@string", .string?): ok = true
            case ("@partition", .integer(let value)?): ok = value == Int64(route)
            case ("@partitions", .integer(let value)?): ok = value == Int64(partitions)
            default: ok = false
            }
            if !ok { problems.append("\(path) should be \(text), is \(actual.map(encode) ?? "absent")") }
            return
        }
        guard let actual else { return problems.append("\(path) is missing") }
        switch (expect, actual) {
        case (.object(let fields), .object(let actualFields)):
            for (key, value) in fields.sorted(by: { $0.key < $1.key }) {
                match(value, actualFields[key], path: "\(path).\(key)", route: route, partitions: partitions, problems: &problems)
            }
        case (.array(let items), .array(let actualItems)):
            guard items.count == actualItems.count else { return problems.append("\(path) has \(actualItems.count) items, not \(items.count)") }
            for (offset, (item, actualItem)) in zip(items, actualItems).enumerated() {
                match(item, actualItem, path: "\(path)[\(offset)]", route: route, partitions: partitions, problems: &problems)
            }
        default:
            if expect != actual { problems.append("\(path) should be \(encode(expect)), is \(encode(actual))") }
        }
    }

    /// Compact JSON.
    static func encode(_ value: JSONValue) -> String {
        switch value {
        case .null: return "null"
        case .bool(let flag): return flag ? "true" : "false"
        case .integer(let number): return String(number)
        case .number(let number): return String(number)
        case .string(let text): return quote(text)
        case .array(let items): return "[" + items.map(encode).joined(separator: ",") + "]"
        case .object(let fields): return "{" + fields.sorted { $0.key < $1.key }.map { quote($0.key) + ":" + encode($0.value) }.joined(separator: ",") + "}"
        }
    }

    static func quote(_ text: String) -> String {
        var out = "\""
        for scalar in text.unicodeScalars {
            switch scalar {
            case "\"": out += "\\\""
            case "\\": out += "\\\\"
            case "\n": out += "\\n"
            case "\r": out += "\\r"
            case "\t": out += "\\t"
            case _ where scalar.value < 0x20: out += String(format: "\\u%04x", scalar.value)
            default: out.unicodeScalars.append(scalar)
            }
        }
        return out + "\""
    }
}

/// The README's placeholders: `{buffer}`, `{buffer:NAME}`, `{conn:NAME}`, `{id}`, `{id:NAME}`.
struct Placeholders {
    let prefix: String
    let connectionPrefix: String

    func substitute(_ value: JSONValue) -> JSONValue {
        switch value {
        case .string(let text): .string(replace(text))
        case .array(let items): .array(items.map(substitute))
        case .object(let fields): .object(Dictionary(uniqueKeysWithValues: fields.map { (replace($0.key), substitute($0.value)) }))
        default: value
        }
    }

    private func replace(_ text: String) -> String {
        guard text.contains("{") else { return text }
        var out = ""
        var rest = Substring(text)
        while let open = rest.firstIndex(of: "{") {
            out += rest[..<open]
            guard let close = rest[open...].firstIndex(of: "}") else { break }
            let token = rest[rest.index(after: open)..<close]
            let parts = token.split(separator: ":", maxSplits: 1).map(String.init)
            let name = parts.count > 1 ? parts[1] : nil
            switch parts.first {
            case "buffer": out += "\(prefix)/\(name ?? "main")"
            case "conn": out += "\(connectionPrefix)-\(name ?? "main")"
            case "id": out += name.map { "\(connectionPrefix)-\($0)" } ?? UUID().uuidString
            default: out += rest[open...close]
            }
            rest = rest[rest.index(after: close)...]
        }
        return out + rest
    }
}

extension JSONValue {
    var stringValue: String? {
        if case .string(let text) = self { text } else { nil }
    }
}
