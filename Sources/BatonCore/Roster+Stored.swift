/// A roster as the store keeps it (`baton_buffers.roster`, jsonb): one JSON object,
/// `{"m":[{"i":1,"u":"ann","c":"c1","t":7,"e":1700000000000,"p":"frontend"}],"r":[{"i":2,"u":"bob","x":1700000030000}]}`:
/// members (`i` replica id, `u` user, `c` connection, `t` token, `e` expiry in milliseconds since the
/// epoch, `p` principal or null) and reservations (`i`, `u`, `x` the end of the grace). The store finds a
/// connection's memberships by containment (`roster @> '{"m":[{"c":"c1"}]}'`), which is why members are
/// objects with a key per field.
extension Roster {
    /// The stored form; nil for an empty roster (stored as SQL NULL, so a buffer that never had members
    /// costs nothing).
    public var storedText: String? {
        guard !(members.isEmpty && reservations.isEmpty) else { return nil }
        var json = JSONWriter(capacity: 64 + 96 * members.count)
        json.raw("m", ProtocolCodec.eventArray(members.map { member in
            var item = JSONWriter(capacity: 96)
            item.integer("i", member.replicaID)
            item.string("u", member.user)
            item.string("c", member.connection)
            item.integer("t", member.token)
            item.integer("e", member.expiresAt.milliseconds)
            item.string("p", member.principal)
            return item.finish()
        }))
        json.raw("r", ProtocolCodec.eventArray(reservations.map { reservation in
            var item = JSONWriter(capacity: 48)
            item.integer("i", reservation.replicaID)
            item.string("u", reservation.user)
            item.integer("x", reservation.until.milliseconds)
            return item.finish()
        }))
        return String(decoding: json.finish(), as: UTF8.self)
    }

    /// The roster of a stored form (nil: empty).
    ///
    /// - Throws: ``RosterTextError`` naming what is malformed.
    public init(storedText text: String?) throws(RosterTextError) {
        guard let text else {
            self.init()
            return
        }
        let value: JSONValue
        do {
            value = try JSONParser.parse(Array(text.utf8))
        } catch {
            throw RosterTextError("not JSON (\(error.reason) at byte \(error.offset))")
        }
        guard case .object(let fields) = value, case .array(let storedMembers)? = fields["m"], case .array(let storedReservations)? = fields["r"] else {
            throw RosterTextError("not an object with the arrays 'm' and 'r'")
        }
        var members: [Member] = []
        for item in storedMembers {
            guard case .object(let member) = item, case .integer(let id)? = member["i"], case .string(let user)? = member["u"],
                  case .string(let connection)? = member["c"], case .integer(let token)? = member["t"], case .integer(let expires)? = member["e"] else {
                throw RosterTextError("a member is not {i, u, c, t, e, p}: \(item.excerpt)")
            }
            let principal: String? = if case .string(let principal)? = member["p"] { principal } else { nil }
            members.append(Member(
                replicaID: Int(id), user: user, connection: connection, token: token, expiresAt: Timestamp(milliseconds: expires), principal: principal
            ))
        }
        var reservations: [Reservation] = []
        for item in storedReservations {
            guard case .object(let reservation) = item, case .integer(let id)? = reservation["i"], case .string(let user)? = reservation["u"],
                  case .integer(let until)? = reservation["x"] else {
                throw RosterTextError("a reservation is not {i, u, x}: \(item.excerpt)")
            }
            reservations.append(Reservation(replicaID: Int(id), user: user, until: Timestamp(milliseconds: until)))
        }
        self.init(members: members, reservations: reservations)
    }

    /// The earliest end of a live member's membership, if any (when the sweep must look at the buffer).
    public var earliestExpiry: Timestamp? {
        members.map(\.expiresAt).min()
    }
}

/// A stored roster that cannot be read.
public struct RosterTextError: Error, Sendable, CustomStringConvertible {
    public let description: String

    init(_ description: String) {
        self.description = description
    }
}
