import BatonCore
import Testing

private let ann = Holder(user: "ann", connection: "c-ann")
private let t0 = Timestamp(milliseconds: 1_000_000)

private func request(_ command: Command, principal: String?, id: String = "r", deadline: Timestamp? = nil) -> Request {
    Request(requestID: id, command: command, principal: principal, deadline: deadline)
}

/// Principals own leases; deadlines, reply destinations, bounded replies and log escaping (issue 8).
@Suite struct AdmissionTests {
    let partitioner = try! Partitioner(count: 1)

    @Test func onlyTheClaimingPrincipalMayExtendRenewOrRelease() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        let grant = state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 5000), principal: "frontend-a"), at: t0)
        #expect(grant.reply.status == .granted && grant.changes.first?.principal == "frontend-a")
        #expect(state.state(of: "b").principal == "frontend-a")
        let later = t0.adding(milliseconds: 10)
        // Same user and connection, other principal: no extension.
        #expect(state.apply(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 5000), principal: "frontend-b"), at: later).reply.status == .denied)
        #expect(state.apply(request(.renew(buffer: "b", connection: ann.connection, token: 1, leaseMilliseconds: 5000), principal: "frontend-b"), at: later).reply.status == .notOwner)
        #expect(state.apply(request(.release(buffer: "b", connection: ann.connection, token: 1), principal: "frontend-b"), at: later).reply.status == .notOwner)
        #expect(state.apply(request(.releaseConnection(connection: ann.connection), principal: "frontend-b"), at: later).reply.releasedCount == 0)
        // A request without a principal does not match a lease that has one.
        #expect(state.apply(request(.release(buffer: "b", connection: ann.connection, token: 1), principal: nil), at: later).reply.status == .notOwner)
        // The owner may; an operator's force release needs none.
        #expect(state.apply(request(.renew(buffer: "b", connection: ann.connection, token: 1, leaseMilliseconds: 5000), principal: "frontend-a"), at: later).reply.status == .renewed)
        let forced = state.apply(request(.forceRelease(buffer: "b", reason: nil), principal: "operator"), at: later)
        #expect(forced.reply.status == .released && forced.changes.first?.principal == "operator" && forced.changes.first?.forced == true)
        #expect(state.state(of: "b").principal == nil, "a released buffer has no principal")
    }

    @Test func principalsCompareByExactBytes() {
        #expect(OwnershipRules.samePrincipal("é", "é"))
        #expect(!OwnershipRules.samePrincipal("\u{E9}", "e\u{301}"))
        #expect(OwnershipRules.samePrincipal(nil, nil))
        #expect(!OwnershipRules.samePrincipal("a", nil) && !OwnershipRules.samePrincipal(nil, "a"))
    }

    @Test func deadlinesAreCheckedOnTheDecidersClock() {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        let claim = Command.claim(buffer: "b", holder: ann, leaseMilliseconds: 5000)
        let late = state.apply(request(claim, principal: "p", deadline: t0), at: t0)
        #expect(late.reply.error?.code == .deadlineExceeded && late.changes.isEmpty, "a deadline equal to now has passed")
        let far = state.apply(request(claim, principal: "p", deadline: t0.adding(milliseconds: ProtocolV1.maxRequestLifetimeMilliseconds + 1)), at: t0)
        #expect(far.reply.error?.code == .invalidRequest && far.reply.error?.message.contains("deadline") == true)
        #expect(state.apply(request(claim, principal: "p", deadline: t0.adding(milliseconds: 1)), at: t0).reply.status == .granted)
    }

    @Test func releasedConnectionListsABoundedPrefixAndTheFullCount() throws {
        var state = PartitionState(partition: 0, partitioner: partitioner)
        let names = (0..<200).map { "\($0)-" + String(repeating: "\u{1}", count: 900) }
        for name in names {
            _ = state.apply(request(.claim(buffer: name, holder: ann, leaseMilliseconds: 5000), principal: "p", id: name), at: t0)
        }
        let reply = state.apply(request(.releaseConnection(connection: ann.connection), principal: "p"), at: t0).reply
        #expect(reply.releasedCount == 200)
        let listed = try #require(reply.buffers)
        #expect(!listed.isEmpty && listed.count < 200)
        let body = ProtocolCodec.encode(reply)
        #expect(body.count < 100 * 1024, "even fully escaped, the reply stays under the broker's limit (\(body.count) bytes)")
        #expect(try ProtocolCodec.decodeReply(body).releasedCount == 200)
    }

    @Test func fingerprintsIgnoreTheDeadlineButNotTheQuestionOrTheSender() {
        let claim = Command.claim(buffer: "b", holder: ann, leaseMilliseconds: 5000)
        let base = ProtocolCodec.fingerprint(request(claim, principal: "p", deadline: t0))
        #expect(ProtocolCodec.fingerprint(request(claim, principal: "p", deadline: t0.adding(milliseconds: 1000))) == base)
        #expect(ProtocolCodec.fingerprint(request(claim, principal: "q", deadline: t0)) != base)
        #expect(ProtocolCodec.fingerprint(request(.claim(buffer: "c", holder: ann, leaseMilliseconds: 5000), principal: "p")) != base)
        #expect(ProtocolCodec.fingerprint(request(.claim(buffer: "b", holder: ann, leaseMilliseconds: 6000), principal: "p")) != base)
    }

    @Test func theDeadlineFieldRoundTripsAndIsValidated() throws {
        let sent = Request(requestID: "r", command: .inspect(buffer: "b"), deadline: t0)
        #expect(try ProtocolCodec.decodeRequest(ProtocolCodec.encode(sent)).deadline == t0)
        let error = #expect(throws: ProtocolError.self) {
            try ProtocolCodec.decodeRequest(Array(#"{"v":1,"op":"inspect","request_id":"r","buffer":"b","deadline":"tomorrow"}"#.utf8))
        }
        #expect(error?.code == .invalidRequest && error?.message.contains("deadline") == true)
    }

    @Test(arguments: [
        ("amq.rabbitmq.reply-to.g1h2AA5yZXBseUAyNjg0NDIwOAAAPasAAAAAXrM4oA==", true),
        ("amq.gen-JzTY20BRgKO-HjmUJj0wLg", true),
        ("amq.rabbitmq.reply-to", false), ("amq.gen-", false), ("baton.requests.0", false), ("victim", false), ("", false),
    ])
    func onlyTheSendersOwnReplyQueuesAreAnswered(replyTo: String, accepted: Bool) {
        #expect(ProtocolV1.isAcceptedReplyTo(replyTo) == accepted)
    }

    @Test func logValuesCannotForgeLinesOrEscapes() {
        #expect(LogValue.escape("plain name.rs") == "plain name.rs")
        #expect(LogValue.escape("a\nb") == "a\\u{a}b")
        #expect(LogValue.escape("\u{1B}[2J") == "\\u{1b}[2J")
        #expect(LogValue.escape("\u{202E}evil") == "\\u{202e}evil")
        #expect(LogValue.escape("back\\slash") == "back\\\\slash", "a literal backslash cannot pass for an escape")
        #expect(LogValue.escape("буфер/ü.rs") == "буфер/ü.rs")
    }
}
