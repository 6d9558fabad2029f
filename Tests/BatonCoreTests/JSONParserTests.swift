@testable import BatonCore
import Testing

/// The strict request parser that replaced `JSONDecoder` on the worker's hot path.
@Suite struct JSONParserTests {
    func rejection(_ body: String) -> ProtocolError? {
        do {
            _ = try ProtocolCodec.decodeRequest(Array(body.utf8))
            return nil
        } catch {
            return error
        }
    }

    @Test func escapesAndSurrogatePairsDecode() throws {
        let value = try JSONParser.parse(Array(#"{"a":"x\"\\\/\b\f\n\r\t\u00e9\ud83d\ude00","b":[1,-2,3.5,1e3,true,false,null]}"#.utf8))
        guard case .object(let fields) = value else {
            Issue.record("not an object")
            return
        }
        #expect(fields["a"] == .string("x\"\\/\u{8}\u{C}\n\r\té😀"))
        #expect(fields["b"] == .array([.integer(1), .integer(-2), .number(3.5), .number(1000), .bool(true), .bool(false), .null]))
    }

    @Test(arguments: [
        #"{"v":1,"v":1,"op":"inspect","request_id":"r","buffer":"b"}"#,  // duplicate key
        "\u{FEFF}{\"v\":1,\"op\":\"inspect\",\"request_id\":\"r\",\"buffer\":\"b\"}",  // byte order mark
        #"{"v":1,"op":"inspect","request_id":"r","buffer":"b",}"#,  // trailing comma
        #"{"v":1,"op":"inspect","request_id":"r","buffer":"\ud800"}"#,  // lone surrogate
        #"{"v":1,"op":"inspect","request_id":"r","buffer":"b"} x"#,  // trailing data
        #"{"v":01,"op":"inspect","request_id":"r","buffer":"b"}"#,  // leading zero
        "{\"v\":1,\"op\":\"inspect\",\"request_id\":\"r\",\"buffer\":\"a\u{1}b\"}",  // raw control character
    ])
    func nonStrictJSONIsRefused(body: String) {
        #expect(rejection(body)?.code == .invalidRequest, "\(body.debugDescription)")
    }

    @Test func aFractionIsNotAnInteger() {
        let error = rejection(#"{"v":1,"op":"claim","request_id":"r","buffer":"b","user":"u","connection":"c","lease_ms":1500.0}"#)
        #expect(error?.code == .invalidRequest && error?.message.contains("lease_ms") == true)
    }

    @Test func nestingIsBounded() {
        let deep = String(repeating: "[", count: 17) + String(repeating: "]", count: 17)
        #expect(throws: JSONParser.Failure.self) { try JSONParser.parse(Array(deep.utf8)) }
        let fine = String(repeating: "[", count: 16) + String(repeating: "]", count: 16)
        #expect(throws: Never.self) { try JSONParser.parse(Array(fine.utf8)) }
    }
}
