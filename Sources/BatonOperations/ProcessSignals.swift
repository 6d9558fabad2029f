import Foundation
#if canImport(Glibc)
import Glibc
#endif

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

    /// The child's side of the lifeline: in a process started as a lab's `ChildProcess` (`baton worker
    /// --exit-with-parent`), stops it gracefully (SIGTERM to itself, after `announce`) when standard input
    /// reaches end of file, that is when the parent died however it ended, and for good 15 s later.
    public static func exitWithParent(announce: @escaping @Sendable () -> Void) {
        let thread = Thread {
            var buffer = [UInt8](repeating: 0, count: 256)
            while true {
                let count = read(0, &buffer, buffer.count)
                if count == 0 || (count < 0 && errno != EINTR) { break }
            }
            announce()
            kill(getpid(), SIGTERM)
            sleep(15)
            _exit(3)
        }
        thread.name = "baton.parent-watch"
        thread.start()
    }
}
