//! `Admin`: the operators' API behind the `lifeboat` CLI.

use std::sync::Arc;

use lifeboat_common::identity::{Identity, Role};
use lifeboat_proto::v1::{
    GetHostRequest, HostRecord, ListGuestsRequest, ListGuestsResponse, ListHostsRequest, ListHostsResponse,
    WhoAmIRequest, WhoAmIResponse, admin_server::Admin,
};
use tonic::{Request, Response, Status};

use crate::error::ControllerError;
use crate::registry::Registry;

/// The admin service.
pub struct AdminService {
    reg: Arc<Registry>,
}

impl AdminService {
    /// Wraps the registry.
    pub fn new(reg: Arc<Registry>) -> Self {
        AdminService { reg }
    }
}

/// Checks that the caller is a person/tool with at least `needed`.
pub fn authorize<T>(req: &Request<T>, needed: Role, action: &str) -> Result<(String, Role), ControllerError> {
    match super::peer_identity(req)? {
        Identity::Client { name, role } if role.allows(needed) => Ok((name, role)),
        Identity::Client { name, role } => Err(ControllerError::PermissionDenied(format!(
            "{action} needs the {needed} role; certificate '{name}' has role {role}"
        ))),
        other => Err(ControllerError::PermissionDenied(format!(
            "{action} needs a client certificate; this certificate is for {other}"
        ))),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_hosts(&self, req: Request<ListHostsRequest>) -> Result<Response<ListHostsResponse>, Status> {
        authorize(&req, Role::Viewer, "listing hosts")?;
        Ok(Response::new(ListHostsResponse { hosts: self.reg.list_hosts() }))
    }

    async fn get_host(&self, req: Request<GetHostRequest>) -> Result<Response<HostRecord>, Status> {
        authorize(&req, Role::Viewer, "showing a host")?;
        let host = req.get_ref().host.trim();
        if host.is_empty() {
            return Err(ControllerError::InvalidArgument("no host given".into()).into());
        }
        Ok(Response::new(self.reg.get_host(host)?))
    }

    async fn list_guests(&self, req: Request<ListGuestsRequest>) -> Result<Response<ListGuestsResponse>, Status> {
        authorize(&req, Role::Viewer, "listing guests")?;
        let host = req.get_ref().host.trim();
        let filter = if host.is_empty() { None } else { Some(host) };
        Ok(Response::new(ListGuestsResponse { guests: self.reg.list_guests(filter)? }))
    }

    async fn who_am_i(&self, req: Request<WhoAmIRequest>) -> Result<Response<WhoAmIResponse>, Status> {
        let (name, role) = authorize(&req, Role::Viewer, "asking who you are")?;
        Ok(Response::new(WhoAmIResponse { name, role: role.as_str().into() }))
    }
}
