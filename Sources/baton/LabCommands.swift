import Foundation
#if canImport(Glibc)
import Glibc
#endif

/// The lab's commands (`bench`, `chaos`, `demo`, `bench-store`) live in `baton-lab`, so that
/// a deployment's `baton` does not link the lab. `baton bench …` runs `baton-lab bench …` from the folder of
/// this executable, in this process's place (same arguments, environment, standard streams and exit code).
enum LabCommands {
    static let names: Set<String> = ["bench", "chaos", "demo", "bench-store"]

    /// This executable's file (`/proc/self/exe` on Linux, as `argv[0]` may be a bare name found on `PATH`).
    static var executable: URL {
        #if os(Linux)
        URL(fileURLWithPath: "/proc/self/exe").resolvingSymlinksInPath()
        #else
        URL(fileURLWithPath: CommandLine.arguments[0]).resolvingSymlinksInPath()
        #endif
    }

    /// When the first argument names a lab command, replaces this process with `baton-lab`; when that cannot
    /// start, says so and exits 1. Otherwise returns.
    static func runIfNamed(_ arguments: [String] = CommandLine.arguments) {
        guard arguments.count > 1, names.contains(arguments[1]) else { return }
        let lab = executable.deletingLastPathComponent().appendingPathComponent("baton-lab").path
        let argv = (["baton-lab"] + arguments.dropFirst()).map { strdup($0) } + [nil]
        execv(lab, argv)
        let reason = String(cString: strerror(errno))
        FileHandle.standardError.write(Data("""
            Error: `baton \(arguments[1])` is a lab command, run by baton-lab beside baton, and \(lab) cannot start: \(reason). \
            Build it with `swift build --product baton-lab` (a deployment's image carries baton alone).\n
            """.utf8))
        exit(1)
    }
}
