import ArgumentParser
import BatonAMQP
import BatonPostgres
import Foundation

/// Every setting of the command line resolves the same way: the flag, else the environment variable,
/// else the default; a value that does not parse is refused with its name and what is allowed.
public enum Setting {
    public static var environment: [String: String] { ProcessInfo.processInfo.environment }

    /// The setting's text.
    public static func text(_ flag: String?, _ variable: String, default value: String) -> String {
        flag ?? environment[variable] ?? value
    }

    /// The setting parsed by `parse`; its error becomes the usage error.
    public static func parse<T>(_ flag: String?, _ variable: String, default value: String, _ parse: (String) throws -> T) throws -> T {
        do {
            return try parse(text(flag, variable, default: value))
        } catch let error as ValidationError {
            throw error
        } catch let error as PostgresError {
            throw ValidationError(error.message)
        } catch let error as AMQPError {
            throw ValidationError(error.message)
        } catch {
            throw ValidationError("\(error)")
        }
    }

    /// An integer setting within `range`.
    public static func integer(_ flag: Int?, _ variable: String, default value: Int, range: ClosedRange<Int>, name: String) throws -> Int {
        let raw = text(flag.map(String.init), variable, default: String(value))
        guard let number = Int(raw), range.contains(number) else {
            throw ValidationError("\(name) '\(raw)' is not allowed: use \(range.lowerBound) to \(range.upperBound)")
        }
        return number
    }
}
