@testable import BatonLab
import Testing

/// The recovery time `baton chaos` reports per fault: when every partition has answered a call made
/// after the fault began.
@Suite struct ChaosRecoveryTests {
    let start = ContinuousClock.now

    func call(_ partition: Int, from: Int, to: Int, failed: Bool = false, waits: Bool = false) -> ChaosRun.Call {
        ChaosRun.Call(
            partition: partition, started: start + .milliseconds(from), finished: start + .milliseconds(to), failed: failed ? "timeout" : nil, waits: waits
        )
    }

    @Test func theLastPartitionToAnswerSetsTheRecovery() {
        let calls = [
            call(0, from: 90, to: 120),  // before the fault
            call(0, from: 110, to: 150),
            call(1, from: 105, to: 2_100),  // partition 1 answers only after 2 s
            call(1, from: 120, to: 2_200),
        ]
        let line = ChaosRun.recovery(calls, at: start + .milliseconds(100), end: start + .milliseconds(300), partitions: 2)
        #expect(line.hasPrefix("recovery 2.000 s"), "\(line)")
        #expect(line.contains("partition 1 last"))
        #expect(
            line.hasSuffix("slowest call around it 2.080 s (2.080 s not counting claims that wait in line; partition 1, made at T+0.020 s, answered at T+2.100 s)"),
            "\(line)"
        )  // 120 ms → 2,200 ms
    }

    /// A claim that waits in line is answered when it leaves it: the line reports the slowest call
    /// without such claims too.
    @Test func claimsThatWaitInLineAreReportedApart() {
        let calls = [
            call(0, from: 110, to: 600),
            call(1, from: 105, to: 1_100),
            call(1, from: 120, to: 4_120, waits: true),  // waited 3 s in line after the fault
        ]
        let line = ChaosRun.recovery(calls, at: start + .milliseconds(100), end: start + .milliseconds(300), partitions: 2)
        #expect(
            line.hasSuffix("slowest call around it 4.000 s (0.995 s not counting claims that wait in line; partition 1, made at T+0.020 s, answered at T+4.020 s)"),
            "\(line)"
        )
    }

    @Test func aPartitionWithoutAnAnswerNeverRecovered() {
        let calls = [call(0, from: 110, to: 150), call(1, from: 110, to: 60_000, failed: true)]
        let line = ChaosRun.recovery(calls, at: start + .milliseconds(100), end: start + .milliseconds(300), partitions: 2)
        #expect(line.hasPrefix("recovery never: 1 of 2 partitions"), "\(line)")
        #expect(line.hasSuffix("partition 1, made at T+0.010 s, failed at T+59.900 s)"), "\(line)")
    }
}
