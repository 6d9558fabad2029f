@testable import BatonClient
import BatonAMQP
import BatonCore
import BatonTesting
import Foundation
import Testing

/// What one frontend, fault or client mix must never cost another frontend (issue 22): each test failed
/// on the code before its fix.
@Suite(.serialized, .timeLimit(.minutes(3))) struct FrontendIsolationTests {
    /// Finding 1: a frontend whose file names come decomposed (macOS) and one that sends them composed
    /// name one buffer, and only one of them owns it.
    @Test func twoSpellingsOfOneNameNeverHaveTwoOwners() async throws {
        let deployment = try await Deployment.make(partitions: 16)
        let worker = deployment.startWorker()
        let composed = "caf\u{E9}.md"
        let decomposed = "cafe\u{301}.md"
        let mac = deployment.client()
        let linux = deployment.client()
        guard case .granted(let lease) = try await mac.claim(decomposed, user: "ann", connection: "c-ann") else {
            Issue.record("not granted")
            return
        }
        #expect(lease.buffer.exactlyEquals(composed), "the lease names the buffer in NFC")
        guard case .denied(let holding) = try await linux.claim(composed, user: "bob", connection: "c-bob") else {
            Issue.record("two frontends own \(composed): one spelled it composed, the other decomposed")
            return
        }
        #expect(holding.holder.user == "ann")
        guard case .renewed = try await mac.renew(decomposed, connection: "c-ann", token: lease.token) else {
            Issue.record("the holder could not renew with the spelling it claimed with")
            return
        }

        // A frontend that does not normalize (another language's client, sending the bytes it was given)
        // is refused with a clear error, on whichever partition it publishes to.
        let raw = try await deployment.connect("nfd", as: deployment.frontendURL)
        let channel = try await raw.openChannel()
        let (_, replies) = try await channel.consume(queue: ProtocolV1.directReplyTo, noAck: true)
        let request = Request(requestID: "r-nfd", command: .claim(buffer: decomposed, holder: Holder(user: "eve", connection: "c-eve"), leaseMilliseconds: 1000))
        try await channel.publish(OutgoingMessage(
            exchange: ProtocolV1.requestsExchange, routingKey: String(deployment.partitioner.partition(of: decomposed)), body: ProtocolCodec.encode(request),
            properties: AMQPProperties(correlationID: "nfd", replyTo: ProtocolV1.directReplyTo, userID: deployment.frontendURL.user), mandatory: true
        ))
        let answer = try #require(try await replies.next(max: 1, timeout: .seconds(10)).first)
        let reply = try ProtocolCodec.decodeReply(answer.body)
        #expect(reply.error?.code == .invalidRequest)
        #expect(reply.error?.message.contains("field 'buffer' is not in Unicode NFC") == true, "\(String(describing: reply.error))")
        #expect(try await linux.inspect(composed).holder?.holder.user == "ann")
        await raw.close()
        await mac.close()
        await linux.close()
        await worker.stop()
    }
}
