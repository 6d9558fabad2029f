import Foundation

/// Process-wide signal handling for the command line's long-running reads.
public enum ProcessSignals {
    /// Until cancelled, SIGINT and SIGTERM flush standard output and exit the process with status 0
    /// (what was printed is out, and an interrupted follow ends well).
    public static func exitOnInterrupt() -> ExitOnInterrupt {
        ExitOnInterrupt(sources: [SIGINT, SIGTERM].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number)
            source.setEventHandler {
                fflush(nil)
                exit(0)
            }
            source.resume()
            return source
        })
    }

    /// The handlers ``exitOnInterrupt()`` installed.
    public struct ExitOnInterrupt: @unchecked Sendable {
        let sources: [any DispatchSourceSignal]

        /// Removes the handlers (the signals stay ignored, as before they were installed by nothing else).
        public func cancel() { sources.forEach { $0.cancel() } }
    }
}
