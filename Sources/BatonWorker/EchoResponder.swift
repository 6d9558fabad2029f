import BatonCore
import Foundation

/// The benchmark's broker echo (`baton worker --echo`, scratch virtual hosts only): it stands in for the
/// store, so that the partition machine runs its whole path (admission, batches, replies, acks) and only
/// the database is missing. Every request is answered as if it succeeded, at the wall clock's time.
enum EchoResponder {
    /// The replies to a batch, one per request, as if each was decided in its favour.
    static func apply(_ requests: [Request], partition: Int, partitions: Int) -> BatchResult {
        let now = Timestamp(milliseconds: Int64(Date().timeIntervalSince1970 * 1000))
        let replies = requests.map { request -> Reply? in
            let status: ReplyStatus = switch request.operation {
            case .claim: .granted
            case .renew: .renewed
            case .release, .forceRelease: .released
            case .inspect: .state
            case .releaseConnection: .releasedConnection
            case .describe: .description
            case .events: .events
            case .join: .joined
            case .leave: .left
            }
            if request.operation.isRead {
                return Reply(
                    requestID: request.requestID, status: status, buffer: request.buffer, at: now, partition: partition,
                    deployment: status == .description ? DeploymentDescription(partitions: partitions) : nil,
                    events: status == .events ? EventPage(events: [], position: 0, more: false, missed: false) : nil
                )
            }
            return Reply(
                requestID: request.requestID, status: status, buffer: request.buffer, holder: nil, token: 1,
                expiresAt: now.adding(milliseconds: 30_000), at: now, partition: partition, buffers: status == .releasedConnection ? [] : nil
            )
        }
        return BatchResult(replies: replies, changes: [], replayed: 0, attempts: 1)
    }

    /// The `events` reads of a batch: an empty page each.
    static func read(_ requests: [Request], partition: Int) -> [Reply] {
        apply(requests, partition: partition, partitions: 1).replies.compactMap { $0 }
    }
}
