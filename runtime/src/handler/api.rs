//! The enrollment API (`/api/machines`): the operator lists, defines and removes machines over
//! HTTP, with the validation VM files get, instead of writing files into the VMs directory.
//!
//! It exists only when the stack runs with `--api-token-file`; over the network every request
//! needs that operator token (`Authorization: Bearer <token>`), on the control socket (the
//! stack's user only) none. A definition is written whole (temp file, fsync, rename) and the
//! index is republished before the reply, so the next request already sees the change.

use pxelab_contract::VmDefinition;

use super::Context;
use crate::{
    access, log,
    server::{Channel, Request, Response},
    vms::WriteError,
};

const API_ROUTES: &str =
    "GET /api/machines, GET/PUT/DELETE /api/machines/<name> (PUT body: a VM definition)";

impl Context {
    pub(super) fn api(&self, r: &Request, path: &[&str]) -> Response {
        let Some(token) = &self.api_token else {
            return Response::line(
                404,
                "the enrollment API is off: start pxelab-stack with --api-token-file <file> (a file, not readable by others, holding the operator token) to serve /api/machines",
            );
        };
        if r.channel == Channel::Network
            && !access::bearer_matches(r.header("authorization"), token)
        {
            return Response::line(
                401,
                "the enrollment API needs the operator token: send Authorization: Bearer <the token in the stack's --api-token-file>",
            )
            .with_header("WWW-Authenticate", "Bearer");
        }
        let get = r.method == "GET" || r.method == "HEAD";
        let (allowed, reply) = match path {
            ["machines"] => ("GET, HEAD", get.then(|| self.list_machines())),
            ["machines", name] => (
                "GET, HEAD, PUT, DELETE",
                match r.method.as_str() {
                    "GET" | "HEAD" => Some(self.get_machine(name)),
                    "PUT" => Some(self.put_machine(r, name)),
                    "DELETE" => Some(self.delete_machine(name)),
                    _ => None,
                },
            ),
            _ => {
                let shown: String = r.path.chars().take(120).collect();
                return Response::line(
                    404,
                    &format!("no such API endpoint {shown:?}; endpoints: {API_ROUTES}"),
                );
            }
        };
        reply.unwrap_or_else(|| super::method_not_allowed(r, allowed))
    }

    fn list_machines(&self) -> Response {
        Response::json(200, &self.set().vms)
    }

    fn get_machine(&self, name: &str) -> Response {
        match self.set().by_name(name) {
            Some(vm) => Response::json(200, vm),
            None => unknown(name),
        }
    }

    fn put_machine(&self, r: &Request, name: &str) -> Response {
        let text = match std::str::from_utf8(&r.body) {
            Ok(t) => t,
            Err(_) => return Response::line(400, "the VM definition is not UTF-8 text"),
        };
        let vm = match VmDefinition::from_json(text) {
            Ok(vm) => vm,
            Err(e) => return Response::line(400, &format!("{e}; nothing was written")),
        };
        if vm.name != name {
            return Response::line(
                400,
                &format!(
                    "the definition is of VM {:?} but was sent to /api/machines/{name}: send it to /api/machines/{} (or change its \"name\"); nothing was written",
                    vm.name, vm.name
                ),
            );
        }
        match self.vms.put(&vm) {
            Ok(created) => {
                log!(
                    "{}: definition {} through the API",
                    vm.name,
                    if created { "created" } else { "replaced" }
                );
                let status = if created { 201 } else { 200 };
                Response::json(status, &vm)
                    .with_header("Location", format!("/api/machines/{}", vm.name))
            }
            Err(WriteError::Conflict(why)) => {
                Response::line(409, &format!("{why}; nothing was written"))
            }
            Err(WriteError::Io(why)) => Response::line(500, &why),
        }
    }

    fn delete_machine(&self, name: &str) -> Response {
        match self.vms.remove(name) {
            Ok(Some(vm)) => {
                log!("{}: definition removed through the API", vm.name);
                Response::json(200, &vm)
            }
            Ok(None) => unknown(name),
            Err(why) => Response::line(500, &why),
        }
    }
}

fn unknown(name: &str) -> Response {
    let shown: String = name.chars().take(64).collect();
    Response::line(
        404,
        &format!("no VM named {shown:?} is defined (GET /api/machines lists them)"),
    )
}
