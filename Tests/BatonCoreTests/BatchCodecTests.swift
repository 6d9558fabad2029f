import BatonCore
import Foundation
import Testing

/// Coalesced request messages: `{"v":1,"batch":[...]}` and their replies.
@Suite struct BatchCodecTests {
    let claim = Request(requestID: "r1", command: .claim(buffer: "a", holder: Holder(user: "u", connection: "c"), leaseMilliseconds: 30_000))
    let inspect = Request(requestID: "r2", command: .inspect(buffer: "b"))

    @Test func aSingleRequestStaysASingleRequest() throws {
        guard case .single(let request) = try ProtocolCodec.decodeMessage(ProtocolCodec.encode(claim)) else {
            Issue.record("not single")
            return
        }
        #expect(request == claim)
    }

    @Test func aBatchDecodesElementByElement() throws {
        var body = Array(#"{"v":1,"batch":["#.utf8) + ProtocolCodec.encode(claim) + Array(#",{"v":1,"op":"claim","request_id":"r3","buffer":"x"},7,"#.utf8)
        body += ProtocolCodec.encode(inspect) + Array("]}".utf8)
        guard case .batch(let elements) = try ProtocolCodec.decodeMessage(body) else {
            Issue.record("not a batch")
            return
        }
        #expect(elements.count == 4)
        #expect(try elements[0].get() == claim)
        #expect(throws: ProtocolError.self) { try elements[1].get() }
        if case .failure(let error) = elements[1] { #expect(error.requestID == "r3" && error.message.contains("user")) }
        if case .failure(let error) = elements[2] { #expect(error.message.contains("element 2")) }
        #expect(try elements[3].get() == inspect)
        guard case .batch(let again) = try ProtocolCodec.decodeMessage(ProtocolCodec.encodeBatch([claim, inspect])) else {
            Issue.record("encodeBatch is not a batch")
            return
        }
        #expect(try again.map { try $0.get() } == [claim, inspect])
    }

    @Test(arguments: [
        (#"{"v":1,"batch":[]}"#, "1 to 256"),
        (#"{"v":1,"batch":{}}"#, "array"),
        (#"{"v":1,"batch":[{}],"op":"claim"}"#, "'op' is not allowed"),
        (#"{"v":2,"batch":[{}]}"#, "version 2"),
        (#"{"batch":[{}]}"#, "'v' is missing"),
    ])
    func badEnvelopesAreRefusedWhole(body: String, fragment: String) {
        let error = #expect(throws: ProtocolError.self) { try ProtocolCodec.decodeMessage(Array(body.utf8)) }
        #expect(error?.message.contains(fragment) == true, "\(error?.message ?? "")")
    }

    @Test func moreThan256RequestsAreRefused() {
        let body = ProtocolCodec.encodeBatch(Array(repeating: inspect, count: 257))
        let error = #expect(throws: ProtocolError.self) { try ProtocolCodec.decodeMessage(body) }
        #expect(error?.message.contains("257") == true)
    }

    @Test func batchRepliesDecodeInOrder() throws {
        let replies = [
            Reply(requestID: "r1", status: .granted, buffer: "a", holder: Holder(user: "u", connection: "c"), token: 1, partition: 0),
            Reply.rejection(ProtocolError(code: .invalidRequest, message: "no", requestID: "r3"), partition: 0, at: nil),
        ]
        let parts = ProtocolCodec.encodeBatchReply(replies)
        #expect(parts.count == 1)
        #expect(try ProtocolCodec.decodeReplies(parts[0]) == replies)
        #expect(try ProtocolCodec.decodeReplies(ProtocolCodec.encode(replies[0])) == [replies[0]])
    }

    @Test func largeBatchRepliesAreSplitUnderTheLimitInOrder() throws {
        // 256 replies naming a holder whose names escape to 6 bytes a character: about 3 KiB each.
        let names = String(repeating: "\u{1}", count: 256)
        let replies = (0..<256).map { index in
            Reply(requestID: "r\(index)", status: .state, buffer: "b", holder: Holder(user: names, connection: names), token: 1, partition: 0)
        }
        let parts = ProtocolCodec.encodeBatchReply(replies)
        #expect(parts.count > 1)
        #expect(parts.allSatisfy { $0.count <= ProtocolV1.maxBatchReplyBytes + 64 })
        #expect(try parts.flatMap { try ProtocolCodec.decodeReplies($0) } == replies)
        #expect(String(decoding: parts[1], as: UTF8.self).contains(#""first":"#))
    }

    @Test func aCommitsEventsGoInFewMessagesUnderTheLimitInOrder() throws {
        let names = String(repeating: "\u{1}", count: 256)
        let changes = (0..<300).map { index in
            OwnershipChange(
                kind: index % 2 == 0 ? .granted : .released, buffer: "b\(index)", holder: Holder(user: names, connection: "c"), token: Int64(index),
                at: Timestamp(milliseconds: 1_000), expiresAt: Timestamp(milliseconds: 2_000)
            )
        }
        let positioned = changes.enumerated().map { PositionedChange(seq: Int64(100 + $0.offset * 3), partition: 7, change: $0.element) }
        let parts = ProtocolCodec.encodeEvents(partition: 7, positioned)
        #expect(parts.count > 1)
        #expect(parts.map(\.count).reduce(0, +) == changes.count)
        #expect(parts.allSatisfy { $0.body.count <= ProtocolV1.maxBatchReplyBytes })
        var tokens: [Int64] = []
        var positions: [Int64] = []
        for part in parts {
            let object = try #require(try JSONSerialization.jsonObject(with: Data(part.body)) as? [String: Any])
            #expect(object["v"] as? Int == 1 && object["partition"] as? Int == 7)
            let events = try #require(object["events"] as? [[String: Any]])
            #expect(events.count == part.count)
            tokens += events.compactMap { ($0["token"] as? Int).map(Int64.init) }
            positions += events.compactMap { ($0["seq"] as? Int).map(Int64.init) }
            #expect(events.allSatisfy { $0["partition"] as? Int == 7 }, "every event names its partition")
        }
        #expect(tokens == changes.map(\.token), "every change, once, in commit order")
        #expect(positions == positioned.map(\.seq), "each with its position")
        #expect(try ProtocolCodec.decodeEventMessage(parts[0].body).map(\.seq) == Array(positioned.prefix(parts[0].count).map(\.seq)), "read back")
        // Each element is exactly the event a per-change message carries.
        let single = try #require(ProtocolCodec.encodeEvents(partition: 7, [positioned[0]]).first)
        #expect(String(decoding: single.body, as: UTF8.self) == #"{"v":1,"partition":7,"events":["# + String(decoding: ProtocolCodec.encodeEvent(positioned[0]), as: UTF8.self) + "]}")
    }
}
