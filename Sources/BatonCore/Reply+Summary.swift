extension Reply {
    /// The reply in one line for a person (`baton claim` and friends print it).
    public var summary: String {
        let reply = self
        let buffer = reply.buffer.map { "'\($0)'" } ?? ""
        let token = reply.token.map(String.init) ?? "-"
        let until = reply.expiresAt.map { " until \($0)" } ?? ""
        let partition = reply.partition.map { " (partition \($0))" } ?? ""
        switch reply.status {
        case .granted: return "granted \(buffer) to \(reply.holder.map(String.init(describing:)) ?? "?"): token \(token)\(until)\(partition)"
        case .denied: return "denied \(buffer): held by \(reply.holder.map(String.init(describing:)) ?? "?") with token \(token)\(until)\(partition)"
        case .renewed: return "renewed \(buffer): token \(token)\(until)\(partition)"
        case .released: return "released \(buffer): token \(token)\(partition)"
        case .notOwner:
            let current = reply.holder.map { "; held by \($0) with token \(token)\(until)" } ?? "; nobody holds it"
            return "not owner of \(buffer)\(current)\(partition)"
        case .state:
            let holder = reply.holder.map { "held by \($0) with token \(token)\(until)" } ?? "free (last token \(token))"
            let members = reply.roster.map { roster in
                roster.count == 0 ? "" : "; \(roster.count) member(s): " + roster.listed.map { "\($0.replicaID) \(LogValue.escape($0.user))@\(LogValue.escape($0.connection))" }
                    .joined(separator: ", ") + (roster.count > roster.listed.count ? " and \(roster.count - roster.listed.count) more" : "")
            } ?? ""
            return "\(buffer) is \(holder)\(members)\(partition)"
        case .releasedConnection:
            let buffers = reply.buffers ?? []
            let count = reply.releasedCount ?? buffers.count
            let more = count > buffers.count ? " and \(count - buffers.count) more" : ""
            let ended = reply.endedMemberships.map { $0 > 0 ? "; ended \($0) membership(s)" : "" } ?? ""
            return (count == 0 ? "released nothing" : "released \(count) buffer(s): \(buffers.map(LogValue.escape).joined(separator: ", "))\(more)") + ended
        case .description:
            let deployment = reply.deployment
            return "protocol v\(deployment?.protocolVersion ?? 0) revision \(deployment?.revision ?? 0), \(deployment?.partitions ?? 0) partitions; ops: \(deployment?.ops.joined(separator: ", ") ?? "")"
        case .events:
            let page = reply.events ?? EventPage(events: [], position: 0, more: false, missed: false)
            let lines = page.events.map(Reply.line)
            let tail = "position \(page.position)\(page.more ? ", more after it" : "")\(page.missed ? "; changes before these were pruned (missed)" : "")\(partition)"
            return (lines + [tail]).joined(separator: "\n")
        case .joined:
            let membership = reply.membership
            return "joined \(buffer) as replica \(membership?.replicaID ?? 0)\(membership?.reclaimed == true ? " (reclaimed)" : ""): token \(token)\(until); \(membership?.members ?? 0) member(s)\(partition)"
        case .left:
            return "left \(buffer): replica \(reply.membership?.replicaID ?? 0) is free\(partition)"
        case .notMember:
            return "not a member of \(buffer) (no live membership of that connection and token)\(partition)"
        case .error:
            return "error \(reply.error?.code.rawValue ?? ""): \(reply.error?.message ?? "")"
        }
    }
}

extension Reply {
    /// One change in one line for a person (`baton events`, `baton watch`).
    public static func line(_ event: PositionedChange) -> String {
        let change = event.change
        return "\(event.partition):\(event.seq) \(change.kind) '\(LogValue.escape(change.buffer))' \(change.holder) token \(change.token) at \(change.at)\(change.forced ? " (forced)" : "")"
    }
}
