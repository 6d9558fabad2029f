/// Exponential backoff with full jitter, for reconnecting and retrying.
public struct Backoff: Sendable {
    /// The first delay's upper bound.
    public var initial: Duration
    /// The largest delay.
    public var maximum: Duration
    private var attempt = 0

    /// Creates a backoff from `initial` doubling up to `maximum`.
    public init(initial: Duration = .milliseconds(100), maximum: Duration = .seconds(5)) {
        self.initial = initial
        self.maximum = maximum
    }

    /// The next delay: uniform in [cap/2, cap] where cap doubles each attempt up to ``maximum``.
    public mutating func next() -> Duration {
        let factor = 1 << min(attempt, 20)
        attempt += 1
        let cap = min(initial * factor, maximum)
        return cap * Double.random(in: 0.5...1.0)
    }

    /// Starts over after a success.
    public mutating func reset() {
        attempt = 0
    }
}
