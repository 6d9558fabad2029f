/// The broker users of Baton's commands and their settings, shared by the command line and anything
/// that starts Baton processes.
/// Which broker user a command acts as (docs/operations.md, "Broker permissions").
public enum BrokerRole: Sendable {
    /// Workers, topology and status: `BATON_AMQP_URL`.
    case worker
    /// Frontends (claim, renew, release, inspect, release-connection, demo): `BATON_FRONTEND_AMQP_URL`.
    case frontend
    /// Operators (force-release): `BATON_OPERATOR_AMQP_URL`.
    case `operator`

    /// The environment variable that holds this role's broker URL(s).
    public var variable: String {
        switch self {
        case .worker: "BATON_AMQP_URL"
        case .frontend: "BATON_FRONTEND_AMQP_URL"
        case .operator: "BATON_OPERATOR_AMQP_URL"
        }
    }

    /// The URL of the local services' user for this role (scripts/services, docker-compose.yml).
    public var defaultURL: String {
        switch self {
        case .worker: "amqp://baton-worker:baton-worker@127.0.0.1:55672/%2F"
        case .frontend: "amqp://baton-frontend:baton-frontend@127.0.0.1:55672/%2F"
        case .operator: "amqp://baton-operator:baton-operator@127.0.0.1:55672/%2F"
        }
    }
}
