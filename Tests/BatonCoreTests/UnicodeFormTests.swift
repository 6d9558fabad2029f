import BatonCore
import Testing

/// Names reach a decision only in NFC (issue 22, findings 1 and 14): other forms are refused at admission,
/// clients normalize, and identities compare by exact bytes.
@Suite struct UnicodeFormTests {
    let composed = "caf\u{E9}.md"
    let decomposed = "cafe\u{301}.md"

    private func rejection(_ json: String) -> ProtocolError? {
        do {
            _ = try ProtocolCodec.decodeRequest(Array(json.utf8))
            return nil
        } catch {
            return error
        }
    }

    @Test func theTwoSpellingsAreEqualToSwiftButNotInBytes() {
        #expect(composed == decomposed)
        #expect(!composed.exactlyEquals(decomposed))
    }

    /// Exact comparison and hashing agree with the bytes for small (inline) and large strings, for strings
    /// of one length that differ in one byte, and for a string that is not native (a substring's copy).
    @Test func exactComparisonAndHashingFollowTheBytes() {
        let long = String(repeating: "project:42/src/", count: 8) + "main.rs"
        let pairs: [(String, String, Bool)] = [
            ("", "", true), ("a", "a", true), ("a", "b", false), ("ab", "a", false),
            (long, String(long.utf8.map { Character(UnicodeScalar($0)) }), true),
            (long, String(long.dropLast()) + "t", false), (long, String(long.dropLast()), false),
            (composed, decomposed, false), (composed, "caf\u{E9}.md", true),
        ]
        for (left, right, equal) in pairs {
            #expect(left.exactlyEquals(right) == equal, "\(left) and \(right)")
            #expect((ExactString(left) == ExactString(right)) == equal)
            if equal { #expect(ExactString(left).hashValue == ExactString(right).hashValue) }
        }
        #expect(Set([ExactString(composed), ExactString(decomposed), ExactString(long), ExactString(String(long.utf8.map { Character(UnicodeScalar($0)) }))]).count == 3)
    }

    @Test func everyNameFieldRefusesAFormOtherThanNFC() throws {
        let nfd = decomposed
        let cases: [(field: String, json: String)] = [
            ("request_id", #"{"v":1,"op":"inspect","request_id":"\#(nfd)","buffer":"b"}"#),
            ("buffer", #"{"v":1,"op":"claim","request_id":"r","buffer":"\#(nfd)","user":"u","connection":"c"}"#),
            ("user", #"{"v":1,"op":"claim","request_id":"r","buffer":"b","user":"\#(nfd)","connection":"c"}"#),
            ("connection", #"{"v":1,"op":"claim","request_id":"r","buffer":"b","user":"u","connection":"\#(nfd)"}"#),
            ("connection", #"{"v":1,"op":"renew","request_id":"r","buffer":"b","connection":"\#(nfd)","token":1}"#),
            ("connection", #"{"v":1,"op":"release","request_id":"r","buffer":"b","connection":"\#(nfd)","token":1}"#),
            ("connection", #"{"v":1,"op":"release_connection","request_id":"r","connection":"\#(nfd)"}"#),
            ("buffer", #"{"v":1,"op":"inspect","request_id":"r","buffer":"\#(nfd)"}"#),
            ("buffer", #"{"v":1,"op":"events","request_id":"r","buffer":"\#(nfd)"}"#),
            ("buffer", #"{"v":1,"op":"force_release","request_id":"r","buffer":"\#(nfd)"}"#),
        ]
        for (field, json) in cases {
            let error = try #require(rejection(json), "\(field) in NFD was accepted: \(json)")
            #expect(error.code == .invalidRequest)
            #expect(error.message.contains("field '\(field)' is not in Unicode NFC"), "\(error.message)")
            #expect(error.message.contains("U+0065 where NFC has U+00E9"), "\(error.message)")
        }
    }

    @Test func theRefusalStillEchoesTheRequestIDAndBuffer() throws {
        let error = try #require(rejection(#"{"v":1,"op":"claim","request_id":"r-\#(decomposed)","buffer":"\#(decomposed)","user":"u","connection":"c"}"#))
        #expect(error.requestID.map { $0.exactlyEquals("r-\(decomposed)") } == true)
        #expect(error.buffer.map { $0.exactlyEquals(decomposed) } == true)
    }

    @Test func namesInNFCAreAcceptedAndAReasonIsFreeText() throws {
        for name in [composed, "ascii/only.txt", "日本語.md", "\u{D55C}\u{AE00}.txt", "emoji-😀", "Ωmega-\u{1F600}", "Ångström"] {
            #expect(rejection(#"{"v":1,"op":"claim","request_id":"\#(name)","buffer":"\#(name)","user":"\#(name)","connection":"\#(name)"}"#) == nil, "\(name)")
        }
        #expect(rejection(#"{"v":1,"op":"force_release","request_id":"r","buffer":"b","reason":"\#(decomposed)"}"#) == nil)
    }

    @Test func normalizationFormCIsTheStandardOne() {
        // Composed: NFC. Decomposed, a singleton (ANGSTROM SIGN), a composition exclusion (DEVANAGARI QA),
        // Hangul jamo, and marks out of canonical order: not NFC.
        #expect(UnicodeForm.isNFC("\u{E9}") && UnicodeForm.isNFC("\u{D55C}") && UnicodeForm.isNFC("\u{915}\u{93C}"))
        #expect(UnicodeForm.isNFC("\u{1EA1}\u{301}") && UnicodeForm.isNFC(""))
        // A supplementary-plane character before a mark stays itself (Foundation on Linux made U+10041
        // U+0301 into U+00C1, as if it were U+0041).
        #expect(UnicodeForm.isNFC("\u{10041}\u{301}") && UnicodeForm.nfc("\u{10041}\u{301}").exactlyEquals("\u{10041}\u{301}"))
        #expect(UnicodeForm.nfc("\u{11099}\u{110BA}").exactlyEquals("\u{1109A}"), "Kaithi composes in plane 1")
        for (given, normal) in [
            ("e\u{301}", "\u{E9}"), ("\u{212B}", "\u{C5}"), ("\u{958}", "\u{915}\u{93C}"), ("\u{1112}\u{1161}\u{11AB}", "\u{D55C}"),
            ("\u{1E0A}\u{323}", "\u{1E0C}\u{307}"), ("a\u{301}\u{323}", "\u{1EA1}\u{301}"),
        ] {
            #expect(!UnicodeForm.isNFC(given), "\(given.unicodeScalars.map(\.value))")
            #expect(UnicodeForm.nfc(given).exactlyEquals(normal), "\(UnicodeForm.nfc(given).unicodeScalars.map(\.value))")
            #expect(UnicodeForm.isNFC(UnicodeForm.nfc(given)))
        }
    }

    @Test func aClientNormalizesEveryNameAndRoutesByIt() throws {
        let partitioner = try Partitioner(count: 16)
        let request = Request(
            requestID: "r-\(decomposed)", command: .claim(buffer: decomposed, holder: Holder(user: decomposed, connection: decomposed), leaseMilliseconds: 1000)
        ).inNFC()
        guard case .claim(let buffer, let holder, _) = request.command else { Issue.record("not a claim"); return }
        for name in [buffer, holder.user, holder.connection] { #expect(name.exactlyEquals(composed)) }
        #expect(request.requestID.exactlyEquals("r-\(composed)"))
        #expect(try ProtocolCodec.decodeRequest(ProtocolCodec.encode(request)).buffer.map { $0.exactlyEquals(composed) } == true)
        #expect(partitioner.partition(of: buffer) == partitioner.partition(of: composed))
        // Every op that names something.
        let ops: [Command] = [
            .renew(buffer: decomposed, connection: decomposed, token: 1, leaseMilliseconds: 1000), .release(buffer: decomposed, connection: decomposed, token: 1),
            .inspect(buffer: decomposed), .releaseConnection(connection: decomposed), .forceRelease(buffer: decomposed, reason: nil),
            .events(buffer: decomposed, after: nil, limit: 1),
        ]
        for command in ops {
            let body = ProtocolCodec.encode(Request(requestID: "r", command: command).inNFC())
            #expect((try? ProtocolCodec.decodeRequest(body)) != nil, "\(command)")
        }
    }

    /// Finding 14: a request id reused for the other spelling of a buffer is another request.
    @Test func aRecordAnswersOnlyTheExactSameRequest() {
        var state = PartitionState(partition: 0, partitioner: try! Partitioner(count: 1))
        let first = Request(requestID: "r", command: .claim(buffer: composed, holder: Holder(user: "u", connection: "c"), leaseMilliseconds: 10_000), principal: "p")
        let t0 = Timestamp(milliseconds: 5_000_000)
        let decision = state.decideBatch([first], at: t0)
        let recorded = [ExactString("r"): RecordedReply(reply: decision.replies[0]!, fingerprint: ProtocolCodec.fingerprint(first))]
        let other = Request(requestID: "r", command: .claim(buffer: decomposed, holder: Holder(user: "u", connection: "c"), leaseMilliseconds: 10_000), principal: "p")
        let later = state.decideBatch([other], at: t0.adding(milliseconds: 1), recorded: recorded)
        #expect(later.replies[0]?.error?.code == .requestIDReused, "\(String(describing: later.replies[0]))")
        // In one batch, too.
        var fresh = PartitionState(partition: 0, partitioner: try! Partitioner(count: 1))
        let both = fresh.decideBatch([first, other], at: t0)
        #expect(both.replies[1]?.error?.code == .requestIDReused, "\(String(describing: both.replies[1]))")
    }

    /// Finding 14, waiting claims: the other spelling under a waiter's request id is refused, not taken as its repeat.
    @Test func aWaitersRequestIDNamesOnlyItsExactClaim() {
        var state = PartitionState(partition: 0, partitioner: try! Partitioner(count: 1))
        let t0 = Timestamp(milliseconds: 5_000_000)
        _ = state.decide(Request(requestID: "h", command: .claim(buffer: composed, holder: Holder(user: "h", connection: "ch"), leaseMilliseconds: 10_000), principal: "p"), at: t0)
        var waiter = Request(requestID: "w-\(composed)", command: .claim(buffer: composed, holder: Holder(user: "w-\(composed)", connection: "cw"), leaseMilliseconds: 10_000), principal: "p")
        waiter.waiting = Waiting(milliseconds: 60_000, replyTo: "amq.gen-1", correlationID: "1")
        #expect(state.decide(waiter, at: t0).reply == nil, "joined the line")
        var other = waiter
        other.command = .claim(buffer: composed, holder: Holder(user: "w-\(decomposed)", connection: "cw"), leaseMilliseconds: 10_000)
        #expect(state.decide(other, at: t0).reply?.error?.code == .requestIDReused)
    }
}
