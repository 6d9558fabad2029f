import BatonCommandLine
import ArgumentParser
import Logging

/// `baton log-sample`: one log entry with the message and metadata given, in the configured format.
/// Hidden: the integration tests check the JSON format's escaping and flattening with it, and an operator
/// can see what a log shipper will receive.
struct LogSample: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "log-sample",
        abstract: "Log one entry at level info with the given message and metadata (to try --log-format).",
        shouldDisplay: false
    )

    @OptionGroup var log: LogOptions

    @Option(help: "The message.")
    var message = "sample"

    @Option(name: .customLong("metadata"), help: ArgumentHelp("A metadata entry; repeat for several.", valueName: "key=value"))
    var entries: [String] = []

    @Flag(help: "Add nested metadata under 'nested': a string, an array and an empty dictionary.")
    var nested = false

    func validate() throws {
        for entry in entries where entry.firstIndex(of: "=") == nil {
            throw ValidationError("metadata '\(entry)' is not allowed: use key=value")
        }
    }

    func run() throws {
        let logger = try log.logger("baton.log-sample")
        var metadata: Logger.Metadata = [:]
        for entry in entries {
            guard let equals = entry.firstIndex(of: "=") else { continue }
            metadata[String(entry[..<equals])] = .string(String(entry[entry.index(after: equals)...]))
        }
        if nested { metadata["nested"] = ["value": "x", "list": ["a", "b"], "empty": [:]] }
        logger.info(Logger.Message(stringLiteral: message), metadata: metadata)
    }
}
