/// Baton's version: the release it is (CHANGELOG.md), the commit it was built from and when.
public enum BatonVersion {
    /// The release (CHANGELOG.md); a build between releases says so by its commit, `-dirty` or not.
    public static let release = "0.1.0"

    /// `baton 0.1.0 (commit 1a2b3c4d5e6f, built 2026-12-07)`.
    public static var description: String { "baton \(release) (commit \(BuildInfo.commit), built \(BuildInfo.date))" }

    /// The labels of `baton_build_info`.
    public static var labels: BuildLabels { BuildLabels(version: release, commit: BuildInfo.commit, date: BuildInfo.date) }
}
