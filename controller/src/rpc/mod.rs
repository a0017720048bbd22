//! The gRPC layer: authenticate the peer certificate, authorize, delegate
//! to the registry. No business logic here.

pub mod admin;
pub mod agent;
pub mod unwritten;

use lifeboat_common::identity::{Identity, identity_from_der};
use tonic::Request;

use crate::error::ControllerError;

/// The identity proven by the request's client certificate.
pub fn peer_identity<T>(req: &Request<T>) -> Result<Identity, ControllerError> {
    peer_identity_inner(req).inspect_err(|e| {
        crate::conn::request_denied("unauthenticated", "none", req.remote_addr(), &e.to_string());
    })
}

fn peer_identity_inner<T>(req: &Request<T>) -> Result<Identity, ControllerError> {
    let certs =
        req.peer_certs().ok_or_else(|| ControllerError::Unauthenticated("no client certificate presented".into()))?;
    let leaf =
        certs.first().ok_or_else(|| ControllerError::Unauthenticated("empty client certificate chain".into()))?;
    identity_from_der(leaf.as_ref()).map_err(|e| ControllerError::Unauthenticated(e.to_string()))
}

/// When the request's client certificate expires (ms since the epoch), if
/// it can be read.
pub fn peer_not_after_ms<T>(req: &Request<T>) -> Option<i64> {
    let certs = req.peer_certs()?;
    let (_, cert) = x509_parser::parse_x509_certificate(certs.first()?.as_ref()).ok()?;
    cert.validity().not_after.timestamp().checked_mul(1000)
}
