//! Domain errors and the one place they become gRPC status codes.

use thiserror::Error;
use tonic::Status;

/// Everything the controller can refuse or fail with.
#[derive(Debug, Error)]
pub enum ControllerError {
    /// No such host.
    #[error("unknown host '{host}'{}", known_hint(.known))]
    UnknownHost {
        /// What was asked for.
        host: String,
        /// Hosts that do exist.
        known: Vec<String>,
    },
    /// Something else that does not exist (job, guest).
    #[error("{0}")]
    NotFound(String),
    /// No usable client certificate.
    #[error("{0}")]
    Unauthenticated(String),
    /// Certificate valid, but not allowed to do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// Malformed request.
    #[error("{0}")]
    InvalidArgument(String),
    /// The host's agent cannot be asked right now.
    #[error("{0}")]
    AgentUnavailable(String),
    /// A precondition failed; nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// Database failure.
    #[error("database error: {0}")]
    Storage(#[from] crate::store::StoreError),
    /// Repository failure (whatever the backend).
    #[error("database error: {0}")]
    Repo(#[from] crate::ports::RepoError),
    /// A bug or a crashed worker, not the caller's fault.
    #[error("internal error: {0}")]
    Internal(String),
}

/// A refusal naming every failed check and what the operator can do.
pub fn refusal(what: &str, checks: &[lifeboat_proto::v1::Check]) -> ControllerError {
    let failed: Vec<String> = checks
        .iter()
        .filter(|c| !c.ok)
        .map(|c| {
            let remedy = if c.remedy.is_empty() { String::new() } else { format!("\n    what to do: {}", c.remedy) };
            format!("  - {}: {}{remedy}", c.name, c.detail)
        })
        .collect();
    ControllerError::Refused(format!("{what} refused; nothing was changed. Failed checks:\n{}", failed.join("\n")))
}

fn known_hint(known: &[String]) -> String {
    if known.is_empty() { " (no hosts are registered)".into() } else { format!(" (known hosts: {})", known.join(", ")) }
}

impl ControllerError {
    /// The HTTP status of this error (the dashboard), next to the gRPC mapping below.
    pub fn http_status(&self) -> u16 {
        match self {
            ControllerError::UnknownHost { .. } | ControllerError::NotFound(_) => 404,
            ControllerError::InvalidArgument(_) => 400,
            ControllerError::Unauthenticated(_) => 401,
            ControllerError::PermissionDenied(_) => 403,
            ControllerError::Refused(_) => 409,
            ControllerError::AgentUnavailable(_) => 503,
            ControllerError::Storage(crate::store::StoreError::Busy { .. }) => 409,
            ControllerError::Repo(crate::ports::RepoError::Busy { .. }) => 409,
            _ => 500,
        }
    }
}

impl From<ControllerError> for Status {
    fn from(e: ControllerError) -> Status {
        let msg = e.to_string();
        match e {
            ControllerError::UnknownHost { .. } | ControllerError::NotFound(_) => Status::not_found(msg),
            ControllerError::Unauthenticated(_) => Status::unauthenticated(msg),
            ControllerError::PermissionDenied(_) => Status::permission_denied(msg),
            ControllerError::InvalidArgument(_) => Status::invalid_argument(msg),
            ControllerError::AgentUnavailable(_) => Status::unavailable(msg),
            ControllerError::Refused(_) => Status::failed_precondition(msg),
            ControllerError::Storage(crate::store::StoreError::Busy { .. }) => Status::failed_precondition(msg),
            ControllerError::Repo(crate::ports::RepoError::Busy { .. }) => Status::failed_precondition(msg),
            // The call is not resent by clients: the write may have reached etcd.
            ControllerError::Repo(ref r) if r.lost_leadership() => Status::aborted(msg),
            ControllerError::Repo(_) => Status::internal(msg),
            ControllerError::Storage(_) | ControllerError::Internal(_) => Status::internal(msg),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_cut_short_by_lost_leadership_is_aborted_so_clients_do_not_resend_it() {
        let e = ControllerError::Repo(crate::ports::RepoError::LostLeadership("lost (test)".into()));
        let st = Status::from(e);
        assert_eq!(st.code(), tonic::Code::Aborted, "{st:?}");
        let other = Status::from(ControllerError::Repo(crate::ports::RepoError::Stopped));
        assert_eq!(other.code(), tonic::Code::Internal);
    }
}
