import BatonCore
import Foundation
import Testing

/// The client's call schedule (``CallSchedule``): the cases of docs/conformance/call-schedule.json, which
/// the Python client's tests replay too (`clients/python/tests/test_call_schedule.py`), and the
/// schedule's own properties. Pure: no broker, no clock.
@Suite struct CallScheduleTests {
    static let file = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        .appendingPathComponent("docs/conformance/call-schedule.json")

    static func vectors() throws -> [[String: Any]] {
        let root = try JSONSerialization.jsonObject(with: Data(contentsOf: file)) as? [String: Any]
        return root?["cases"] as? [[String: Any]] ?? []
    }

    /// What a step expects, in the schedule's words.
    static func expected(_ value: Any?) -> CallSchedule<Int>.Step? {
        if let word = value as? String {
            return word == "send" ? .send : word == "timed_out" ? .timedOut : nil
        }
        guard let object = value as? [String: Any] else { return nil }
        if let until = (object["wait_until"] as? NSNumber)?.int64Value { return .wait(until: until) }
        if let until = (object["wait_for_channel_until"] as? NSNumber)?.int64Value { return .waitForChannel(until: until) }
        return nil
    }

    @Test func theFileHasCases() throws {
        #expect(try Self.vectors().count >= 7)
    }

    @Test(arguments: try vectors().compactMap { $0["name"] as? String }) func replays(_ name: String) throws {
        let vector = try #require(try Self.vectors().first { $0["name"] as? String == name })
        let resendAfter = (vector["resend_after"] as? NSNumber)?.int64Value
        let deadline = try #require((vector["deadline"] as? NSNumber)?.int64Value)
        var schedule = CallSchedule<Int>(
            resendAfter: resendAfter, deadline: deadline, waiting: vector["waiting"] as? Bool ?? false,
            maxInterval: (vector["max_interval"] as? NSNumber)?.int64Value
        )
        for (index, step) in (vector["steps"] as? [[String: Any]] ?? []).enumerated() {
            let at = try #require((step["at"] as? NSNumber)?.int64Value)
            let channel = (step["channel"] as? NSNumber)?.intValue
            let expected = try #require(Self.expected(step["expect"]), "step \(index): an expect the runner does not know")
            let got = schedule.step(at: at, channel: channel, blocked: step["blocked"] as? Bool ?? false)
            #expect(got == expected, "step \(index) at \(at)")
            if got == .send, let channel {
                schedule.sent(at: at, on: channel, jitter: (step["jitter"] as? NSNumber)?.doubleValue ?? 1.0)
            }
        }
        let end = vector["end"] as? [String: Any] ?? [:]
        #expect(schedule.attempts == (end["attempts"] as? NSNumber)?.intValue)
        #expect(schedule.lastBlocked == (end["last_blocked"] as? Bool))
    }

    /// Whatever the jitter drawn, an attempt never waits past the deadline, intervals never exceed the cap
    /// times the largest jitter, and a channel that stays never gets two attempts closer than the shortest
    /// interval (resend_after times the smallest jitter, or resend_after itself the first time).
    @Test func resendsStayWithinTheirBoundsForAnyJitter() {
        for seed in 0..<200 {
            var random = SplitMix(seed: UInt64(seed))  // WaitingTests.swift
            let resendAfter = Int64(random.next() % 3_000 + 100)
            let deadline = Int64(random.next() % 60_000 + 1)
            let waiting = random.next() % 2 == 0
            var schedule = CallSchedule<Int>(resendAfter: resendAfter, deadline: deadline, waiting: waiting)
            var now: Int64 = 0
            var last: Int64?
            while true {
                let step = schedule.step(at: now, channel: 1, blocked: false)
                switch step {
                case .timedOut:
                    #expect(now >= deadline)
                case .send:
                    if let last {
                        #expect(now - last >= Int64(Double(resendAfter) * 0.8) - 1 || now == deadline, "seed \(seed)")
                    }
                    last = now
                    let jitter = 0.8 + Double(random.next() % 401) / 1_000
                    schedule.sent(at: now, on: 1, jitter: jitter)
                    continue
                case .wait(let until):
                    #expect(until > now && until <= deadline, "seed \(seed)")
                    #expect(until - (last ?? 0) <= Int64(Double(schedule.cap ?? 0) * 1.2) + 1, "seed \(seed)")
                    now = until
                    continue
                case .waitForChannel:
                    Issue.record("a ready channel was refused")
                }
                break
            }
        }
    }
}
