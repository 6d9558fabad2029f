import BatonCore
import Testing

private func decode(_ json: String) throws(ProtocolError) -> Request {
    try ProtocolCodec.decodeRequest(Array(json.utf8))
}

private func rejection(_ bytes: [UInt8]) -> ProtocolError? {
    do {
        _ = try ProtocolCodec.decodeRequest(bytes)
        return nil
    } catch {
        return error
    }
}

private func rejection(_ json: String) -> ProtocolError? { rejection(Array(json.utf8)) }

@Suite struct CodecTests {
    @Test func claimWithDefaults() throws {
        let request = try decode(#"{"v":1,"op":"claim","request_id":"r1","buffer":"b","user":"ann","connection":"c1"}"#)
        #expect(request == Request(requestID: "r1", command: .claim(buffer: "b", holder: Holder(user: "ann", connection: "c1"), leaseMilliseconds: 30_000)))
    }

    @Test func everyOperationDecodes() throws {
        #expect(try decode(#"{"v":1,"op":"renew","request_id":"r","buffer":"b","connection":"c","token":3,"lease_ms":1000}"#).command
            == .renew(buffer: "b", connection: "c", token: 3, leaseMilliseconds: 1000))
        #expect(try decode(#"{"v":1,"op":"release","request_id":"r","buffer":"b","connection":"c","token":9}"#).command
            == .release(buffer: "b", connection: "c", token: 9))
        #expect(try decode(#"{"v":1,"op":"inspect","request_id":"r","buffer":"b"}"#).command == .inspect(buffer: "b"))
        #expect(try decode(#"{"v":1,"op":"release_connection","request_id":"r","connection":"c"}"#).command
            == .releaseConnection(connection: "c"))
        #expect(try decode(#"{"v":1,"op":"force_release","request_id":"r","buffer":"b","reason":"stuck"}"#).command
            == .forceRelease(buffer: "b", reason: "stuck"))
        #expect(try decode(#"{"v":1,"op":"force_release","request_id":"r","buffer":"b"}"#).command == .forceRelease(buffer: "b", reason: nil))
    }

    @Test func encodedRequestsDecodeToThemselves() throws {
        let requests: [Request] = [
            Request(requestID: "a/b", command: .claim(buffer: "буфер/ü.rs", holder: Holder(user: "u\"q", connection: "c\\"), leaseMilliseconds: 3_600_000)),
            Request(requestID: "2", command: .renew(buffer: "x", connection: "c", token: Int64.max, leaseMilliseconds: 1000)),
            Request(requestID: "3", command: .release(buffer: "x", connection: "c", token: 1)),
            Request(requestID: "4", command: .inspect(buffer: "x")),
            Request(requestID: "5", command: .releaseConnection(connection: "c")),
        ]
        for request in requests {
            #expect(try ProtocolCodec.decodeRequest(ProtocolCodec.encode(request)) == request)
        }
    }

    @Test func repliesRoundTripAndCarryEveryField() throws {
        let reply = Reply(
            requestID: "r1", status: .denied, buffer: "project:42/src/main.rs", holder: Holder(user: "ann", connection: "c1"),
            token: 7, expiresAt: Timestamp(milliseconds: 1_795_822_544_123), at: Timestamp(milliseconds: 1_795_822_514_123), partition: 6
        )
        let body = String(decoding: ProtocolCodec.encode(reply), as: UTF8.self)
        #expect(body.contains(#""expires_at":"2026-11-27T23:35:44.123Z""#))
        #expect(body.contains(#""buffer":"project:42/src/main.rs""#))
        #expect(try ProtocolCodec.decodeReply(Array(body.utf8)) == reply)

        let released = Reply(requestID: nil, status: .releasedConnection, at: Timestamp(milliseconds: 0), partition: 3, buffers: ["a", "b"])
        let releasedBody = String(decoding: ProtocolCodec.encode(released), as: UTF8.self)
        for field in [#""request_id":null"#, #""buffer":null"#, #""holder":null"#, #""token":null"#, #""expires_at":null"#, #""buffers":["a","b"]"#] {
            #expect(releasedBody.contains(field), "\(field) in \(releasedBody)")
        }
        #expect(try ProtocolCodec.decodeReply(Array(releasedBody.utf8)) == released)
    }

    @Test(arguments: ["plain", "quote\"back\\slash", "tab\tnew\nline\r", "nul\u{0}bell\u{7}esc\u{1b}del\u{7f}", "ünï/буфер/😀", "</script>"])
    func repliesWithAwkwardStringsDecodeToThemselves(text: String) throws {
        let reply = Reply(
            requestID: text, status: .error, buffer: text, holder: Holder(user: text, connection: text), token: nil,
            at: Timestamp(milliseconds: 5), partition: 0, error: ReplyError(code: .invalidRequest, message: text)
        )
        #expect(try ProtocolCodec.decodeReply(ProtocolCodec.encode(reply)) == reply)
        let connection = Reply(requestID: "r", status: .releasedConnection, at: Timestamp(milliseconds: 5), partition: 1, buffers: [text, "b"])
        #expect(try ProtocolCodec.decodeReply(ProtocolCodec.encode(connection)) == connection)
    }

    @Test func errorRepliesCarryCodeAndMessage() throws {
        let error = ProtocolError(code: .unknownOp, message: "op 'x' is unknown", requestID: "r")
        let body = String(decoding: ProtocolCodec.encode(Reply.rejection(error, partition: 1, at: nil)), as: UTF8.self)
        #expect(body.contains(#""status":"error""#))
        #expect(body.contains(#""error":{"code":"unknown_op","message":"op 'x' is unknown"}"#))
    }

    @Test func eventBody() {
        let change = OwnershipChange(kind: .expired, buffer: "b", holder: Holder(user: "u", connection: "c"), token: 4,
                                     at: Timestamp(milliseconds: 1000), expiresAt: Timestamp(milliseconds: 900))
        let body = String(decoding: ProtocolCodec.encodeEvent(PositionedChange(seq: 42, partition: 3, change: change)), as: UTF8.self)
        for field in [#""v":1"#, #""kind":"expired""#, #""buffer":"b""#, #""holder":{"#, #""token":4"#, #""at":"1970-01-01T00:00:01.000Z""#, #""partition":3"#, #""seq":42"#] {
            #expect(body.contains(field), "\(field) in \(body)")
        }
    }

    // MARK: - Rejections: each class of malformed input gets its code and a message naming field and value.

    @Test(arguments: [
        // not JSON
        ("", ErrorCode.invalidRequest, "not JSON"),
        ("{", .invalidRequest, "not JSON"),
        ("hello", .invalidRequest, "not JSON"),
        // not an object
        ("[1,2]", .invalidRequest, "an array"),
        ("\"claim\"", .invalidRequest, "a string"),
        ("42", .invalidRequest, "a number"),
        ("null", .invalidRequest, "null"),
        // version
        (#"{"op":"claim","request_id":"r"}"#, .invalidRequest, "'v' is missing"),
        (#"{"v":"1","op":"claim","request_id":"r"}"#, .invalidRequest, "'v' must be the integer 1, got \"1\""),
        (#"{"v":2,"op":"claim","request_id":"r","extra":true}"#, .unsupportedVersion, "version 2"),
        (#"{"v":0,"op":"claim","request_id":"r"}"#, .unsupportedVersion, "version 0"),
        // op
        (#"{"v":1,"request_id":"r"}"#, .invalidRequest, "'op' is missing"),
        (#"{"v":1,"op":7,"request_id":"r"}"#, .invalidRequest, "'op' must be a string, got 7"),
        (#"{"v":1,"op":"lock","request_id":"r"}"#, .unknownOp, "op 'lock' is unknown"),
        (#"{"v":1,"op":"CLAIM","request_id":"r"}"#, .unknownOp, "op 'CLAIM' is unknown"),
        // extra fields, including a field of another op
        (#"{"v":1,"op":"inspect","request_id":"r","buffer":"b","colour":"red"}"#, .invalidRequest, "field 'colour' is not allowed for op 'inspect'"),
        (#"{"v":1,"op":"claim","request_id":"r","buffer":"b","user":"u","connection":"c","token":1}"#, .invalidRequest, "field 'token' is not allowed for op 'claim'"),
        // missing fields
        (#"{"v":1,"op":"inspect","buffer":"b"}"#, .invalidRequest, "'request_id' is missing"),
        (#"{"v":1,"op":"claim","request_id":"r","user":"u","connection":"c"}"#, .invalidRequest, "'buffer' is missing"),
        (#"{"v":1,"op":"claim","request_id":"r","buffer":"b","connection":"c"}"#, .invalidRequest, "'user' is missing"),
        (#"{"v":1,"op":"renew","request_id":"r","buffer":"b","connection":"c"}"#, .invalidRequest, "'token' is missing"),
        (#"{"v":1,"op":"release_connection","request_id":"r"}"#, .invalidRequest, "'connection' is missing"),
        // mistyped fields
        (#"{"v":1,"op":"inspect","request_id":5,"buffer":"b"}"#, .invalidRequest, "'request_id' must be a string, got 5"),
        (#"{"v":1,"op":"inspect","request_id":"r","buffer":["b"]}"#, .invalidRequest, "'buffer' must be a string, got an array of 1"),
        (#"{"v":1,"op":"claim","request_id":"r","buffer":"b","user":"u","connection":"c","lease_ms":"30000"}"#, .invalidRequest, "'lease_ms' must be an integer from 1000 to 3600000"),
        (#"{"v":1,"op":"claim","request_id":"r","buffer":"b","user":"u","connection":"c","lease_ms":1500.5}"#, .invalidRequest, "got 1500.5"),
        (#"{"v":1,"op":"claim","request_id":"r","buffer":"b","user":"u","connection":"c","lease_ms":null}"#, .invalidRequest, "got null"),
        (#"{"v":1,"op":"release","request_id":"r","buffer":"b","connection":"c","token":true}"#, .invalidRequest, "'token' must be an integer from 1"),
        // out of range
        (#"{"v":1,"op":"claim","request_id":"r","buffer":"b","user":"u","connection":"c","lease_ms":999}"#, .invalidRequest, "got 999"),
        (#"{"v":1,"op":"claim","request_id":"r","buffer":"b","user":"u","connection":"c","lease_ms":3600001}"#, .invalidRequest, "got 3600001"),
        (#"{"v":1,"op":"claim","request_id":"r","buffer":"b","user":"u","connection":"c","lease_ms":-5}"#, .invalidRequest, "got -5"),
        (#"{"v":1,"op":"claim","request_id":"r","buffer":"b","user":"u","connection":"c","lease_ms":1e30}"#, .invalidRequest, "'lease_ms'"),
        (#"{"v":1,"op":"release","request_id":"r","buffer":"b","connection":"c","token":0}"#, .invalidRequest, "got 0"),
        // empty and forbidden strings
        (#"{"v":1,"op":"inspect","request_id":"","buffer":"b"}"#, .invalidRequest, "'request_id' must be a string of 1 to 128 characters, got \"\""),
        (#"{"v":1,"op":"inspect","request_id":"r","buffer":""}"#, .invalidRequest, "'buffer' must be a string of 1 to 1024 UTF-8 bytes"),
        (#"{"v":1,"op":"inspect","request_id":"r","buffer":"a\u0000b"}"#, .invalidRequest, "must not contain U+0000"),
    ])
    func malformed(json: String, code: ErrorCode, fragment: String) throws {
        let error = try #require(rejection(json), "accepted: \(json)")
        #expect(error.code == code, "\(json) -> \(error)")
        #expect(error.message.contains(fragment), "\(json) -> \(error.message)")
    }

    @Test func overLongStrings() throws {
        let longID = String(repeating: "é", count: 129)
        let idError = try #require(rejection(#"{"v":1,"op":"inspect","request_id":"\#(longID)","buffer":"b"}"#))
        #expect(idError.code == .invalidRequest)
        #expect(idError.message.contains("'request_id'") && idError.message.contains("129 characters"))

        // 128 two-byte characters are fine: the limit counts characters, not bytes.
        #expect(rejection(#"{"v":1,"op":"inspect","request_id":"\#(String(repeating: "é", count: 128))","buffer":"b"}"#) == nil)

        // 1024 bytes is the buffer limit: 512 two-byte characters pass, 513 do not.
        #expect(rejection(#"{"v":1,"op":"inspect","request_id":"r","buffer":"\#(String(repeating: "ü", count: 512))"}"#) == nil)
        let bufferError = try #require(rejection(#"{"v":1,"op":"inspect","request_id":"r","buffer":"\#(String(repeating: "ü", count: 513))"}"#))
        #expect(bufferError.message.contains("1026 bytes"))
        #expect(bufferError.requestID == "r")

        let longUser = String(repeating: "u", count: 257)
        let userError = try #require(rejection(#"{"v":1,"op":"claim","request_id":"r","buffer":"b","user":"\#(longUser)","connection":"c"}"#))
        #expect(userError.message.contains("'user'") && userError.message.contains("257 characters"))
        #expect(userError.buffer == "b", "errors carry the buffer when it could be read")
    }

    @Test func invalidUTF8() throws {
        var bytes = Array(#"{"v":1,"op":"inspect","request_id":"r","buffer":"#.utf8)
        bytes += [0x22, 0xC3, 0x28, 0x22, 0x7D]  // "\xC3(" }
        let error = try #require(rejection(bytes))
        #expect(error.code == .invalidRequest)
        #expect(error.message.contains("UTF-8"))
    }

    @Test func overSixtyFourKiB() throws {
        let padding = String(repeating: "x", count: ProtocolV1.maxBodyBytes)
        let error = try #require(rejection(#"{"v":1,"op":"inspect","request_id":"r","buffer":"\#(padding)"}"#))
        #expect(error.code == .payloadTooLarge)
        #expect(error.message.contains("65536"))
        // Exactly 64 KiB of garbage is parsed (and found not to be JSON); one byte more is too large.
        #expect(rejection([UInt8](repeating: 0x20, count: ProtocolV1.maxBodyBytes))?.code == .invalidRequest)
        #expect(rejection([UInt8](repeating: 0x20, count: ProtocolV1.maxBodyBytes + 1))?.code == .payloadTooLarge)
    }

    @Test func deeplyNestedInputIsRejectedNotCrashed() throws {
        let depth = 30_000
        let nested = String(repeating: "[", count: depth) + String(repeating: "]", count: depth)
        #expect(rejection(nested)?.code == .invalidRequest)
        let inField = #"{"v":1,"op":"inspect","request_id":"r","buffer":"# + nested + "}"
        #expect(rejection(inField)?.code == .invalidRequest)
    }

    @Test func errorsCarryTheRequestIDWhenReadable() throws {
        let error = try #require(rejection(#"{"v":1,"op":"nope","request_id":"abc"}"#))
        #expect(error.requestID == "abc")
        #expect(Reply.rejection(error, partition: 2, at: nil).requestID == "abc")
    }
}
