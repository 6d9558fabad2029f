import BatonCore
import Logging

/// The text log format (``LineLogHandler`` with ``LogFormat/text``): each entry one line of text to
/// standard error, in the layout of swift-log's `StreamLogHandler` but with every metadata value that
/// could be mistaken for more than one value quoted (logfmt):
///
/// ```
/// 2026-11-28T00:57:02.306Z info baton.worker: baton.op=claim baton.request_id="x y=z" [BatonWorker] request refused
/// ```
///
/// `StreamLogHandler` prints `key=value` unquoted, so a request id holding a space and `=` could print
/// what reads as another field (`baton.principal=baton-operator`) into a line. Here a value that is empty
/// or holds a space, `=`, `"` or `\` is written in double quotes with `"` and `\` escaped; control and
/// format characters are escaped in values and the message alike (``LogValue/escape(_:)``), so an entry
/// is always one line. Keys are sorted; nested metadata is flattened as ``JSONLogHandler`` does.
public enum TextLogHandler {
    /// One entry as a line, `\n` included.
    static func line(at time: Timestamp, level: Logger.Level, label: String, message: String, source: String, metadata: Logger.Metadata) -> [UInt8] {
        var text = "\(time.rfc3339) \(level) \(LogValue.escape(label)):"
        for (key, value) in JSONLogHandler.flatten(metadata) {
            text += " \(LogValue.escape(key))=\(quoted(LogValue.escape(value)))"
        }
        text += " [\(source)] \(LogValue.escape(message))\n"
        return Array(text.utf8)
    }

    /// `value` as is, or in double quotes with `"` and `\` escaped when it is empty or holds a space, `=`,
    /// `"` or `\`.
    static func quoted(_ value: String) -> String {
        guard value.isEmpty || value.utf8.contains(where: { $0 == 0x20 || $0 == 0x3D || $0 == 0x22 || $0 == 0x5C }) else { return value }
        var result = "\""
        for character in value.unicodeScalars {
            if character == "\"" || character == "\\" { result.unicodeScalars.append("\\") }
            result.unicodeScalars.append(character)
        }
        return result + "\""
    }
}
