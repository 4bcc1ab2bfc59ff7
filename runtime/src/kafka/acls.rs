//! Authorization of requests, and CreateAcls, DescribeAcls and DeleteAcls: Kafka's APIs for the
//! authorizer's ACLs (Kafka's admin clients and `weir acl` use them). A single node keeps its
//! ACLs in `<data-dir>/meta/acls.json`, a cluster in its metadata image.

use std::collections::BTreeMap;

use kafka_protocol::error::ResponseError;
use kafka_protocol::messages::create_acls_response::AclCreationResult;
use kafka_protocol::messages::delete_acls_response::{
    DeleteAclsFilterResult, DeleteAclsMatchingAcl,
};
use kafka_protocol::messages::describe_acls_response::{AclDescription, DescribeAclsResource};
use kafka_protocol::messages::{
    CreateAclsRequest, CreateAclsResponse, DeleteAclsRequest, DeleteAclsResponse,
    DescribeAclsRequest, DescribeAclsResponse,
};

use super::apis::RequestContext;
use super::{str_bytes, Broker};
use crate::cluster::image::Command;
use crate::security::acl::{
    AclBinding, AclFilter, Acls, Authorizer, Operation, PatternType, Permission, ResourceType,
    CLUSTER_NAME,
};

impl Broker {
    fn with_acls<R>(&self, f: impl FnOnce(&Acls) -> R) -> R {
        match &self.cluster {
            Some(c) => f(&c.image().acls),
            None => f(&self.acls.get()),
        }
    }

    /// Whether the request's principal may do `operation` on the resource. Free when no
    /// authorizer is configured.
    pub fn allowed(
        &self,
        ctx: &RequestContext,
        operation: Operation,
        resource_type: ResourceType,
        name: &str,
    ) -> bool {
        self.decide(ctx, |a, acls, host| {
            a.authorize(acls, &ctx.principal, host, operation, resource_type, name)
        })
    }

    /// Asks the authorizer (with the ACLs and the client's address) when there is one.
    fn decide(
        &self,
        ctx: &RequestContext,
        ask: impl FnOnce(&Authorizer, &Acls, &str) -> bool,
    ) -> bool {
        if !self.authorizer.enabled() {
            return true;
        }
        // An IPv4 client on a dual-stack listener is named by its IPv4 address, as ACLs are.
        let host = ctx.peer.ip().to_canonical().to_string();
        self.with_acls(|acls| ask(&self.authorizer, acls, &host))
    }

    /// The error a client expects when it may not do `operation` on the resource
    /// (TOPIC_/GROUP_/TRANSACTIONAL_ID_/CLUSTER_AUTHORIZATION_FAILED), or None when it may.
    pub fn refusal(
        &self,
        ctx: &RequestContext,
        operation: Operation,
        resource_type: ResourceType,
        name: &str,
    ) -> Option<ResponseError> {
        if self.allowed(ctx, operation, resource_type, name) {
            return None;
        }
        Some(match resource_type {
            ResourceType::Topic => ResponseError::TopicAuthorizationFailed,
            ResourceType::Group => ResponseError::GroupAuthorizationFailed,
            ResourceType::TransactionalId => ResponseError::TransactionalIdAuthorizationFailed,
            ResourceType::Cluster | ResourceType::DelegationToken | ResourceType::User => {
                ResponseError::ClusterAuthorizationFailed
            }
        })
    }

    pub fn allowed_on_cluster(&self, ctx: &RequestContext, operation: Operation) -> bool {
        self.allowed(ctx, operation, ResourceType::Cluster, CLUSTER_NAME)
    }

    /// Whether the principal may do `operation` on some resource of the type.
    pub fn allowed_on_any(
        &self,
        ctx: &RequestContext,
        operation: Operation,
        resource_type: ResourceType,
    ) -> bool {
        self.decide(ctx, |a, acls, host| {
            a.authorize_any(acls, &ctx.principal, host, operation, resource_type)
        })
    }

    /// Whether a topic may be created: Create on the cluster or on the topic, as in Kafka.
    pub fn may_create_topic(&self, ctx: &RequestContext, name: &str) -> bool {
        self.allowed_on_cluster(ctx, Operation::Create)
            || self.allowed(ctx, Operation::Create, ResourceType::Topic, name)
    }

    async fn change_acls(
        &self,
        add: Vec<AclBinding>,
        remove: Vec<AclBinding>,
    ) -> Result<(), String> {
        match &self.cluster {
            Some(c) => {
                if !add.is_empty() {
                    c.run(Command::CreateAcls { acls: add })
                        .await
                        .map_err(|e| e.to_string())?;
                }
                if !remove.is_empty() {
                    c.run(Command::DeleteAcls { acls: remove })
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            None => self
                .acls
                .update(|acls| {
                    acls.extend(add);
                    for acl in &remove {
                        acls.remove(acl);
                    }
                })
                .map_err(|e| format!("{e:#}")),
        }
    }
}

/// The error every entry of an ACL request gets when it cannot be served at all.
fn refusal(broker: &Broker, ctx: &RequestContext, operation: Operation) -> Option<ResponseError> {
    if !broker.authorizer.enabled() {
        Some(ResponseError::SecurityDisabled)
    } else if !broker.allowed_on_cluster(ctx, operation) {
        Some(ResponseError::ClusterAuthorizationFailed)
    } else {
        None
    }
}

/// Each entry's outcome: the whole request's refusal, if any, else the entry's own.
fn each<I, T>(
    refused: Option<ResponseError>,
    entries: impl IntoIterator<Item = I>,
    mut check: impl FnMut(I) -> Result<T, (ResponseError, String)>,
) -> Vec<Result<T, (ResponseError, String)>> {
    entries
        .into_iter()
        .map(|e| match refused {
            Some(code) => Err((code, message(code))),
            None => check(e),
        })
        .collect()
}

/// DescribeAclsRequest and DeleteAcls' filters carry the same fields.
macro_rules! wire_filter {
    ($f:expr) => {
        AclFilter::from_kafka(
            $f.resource_type_filter,
            $f.resource_name_filter.as_deref(),
            $f.pattern_type_filter,
            $f.principal_filter.as_deref(),
            $f.host_filter.as_deref(),
            $f.operation,
            $f.permission_type,
        )
    };
}

fn message(code: ResponseError) -> String {
    match code {
        ResponseError::SecurityDisabled => "no authorizer is configured on this node".into(),
        ResponseError::ClusterAuthorizationFailed => "not authorized on the cluster".into(),
        other => other.to_string(),
    }
}

pub async fn create_acls(
    broker: &Broker,
    ctx: &RequestContext,
    req: CreateAclsRequest,
) -> CreateAclsResponse {
    let refused = refusal(broker, ctx, Operation::Alter);
    let checked = each(refused, req.creations, |c| {
        let invalid = |m: String| (ResponseError::InvalidRequest, m);
        let binding = AclBinding {
            resource_type: ResourceType::from_code(c.resource_type)
                .ok_or_else(|| invalid(format!("invalid resource type {}", c.resource_type)))?,
            resource_name: c.resource_name.to_string(),
            pattern: PatternType::from_code(c.resource_pattern_type).ok_or_else(|| {
                invalid(format!("invalid pattern type {}", c.resource_pattern_type))
            })?,
            principal: c.principal.to_string(),
            host: c.host.to_string(),
            operation: Operation::from_code(c.operation)
                .ok_or_else(|| invalid(format!("invalid operation {}", c.operation)))?,
            permission: Permission::from_code(c.permission_type)
                .ok_or_else(|| invalid(format!("invalid permission type {}", c.permission_type)))?,
        };
        binding.validate().map_err(invalid)?;
        Ok(binding)
    });
    let add: Vec<AclBinding> = checked.iter().flatten().cloned().collect();
    let stored = if add.is_empty() {
        Ok(())
    } else {
        broker.change_acls(add, Vec::new()).await
    };
    let results = checked
        .into_iter()
        .map(|outcome| {
            let (code, msg) = match (outcome, &stored) {
                (Err((code, msg)), _) => (code, msg),
                (Ok(_), Err(msg)) => (ResponseError::UnknownServerError, msg.clone()),
                (Ok(_), Ok(())) => return AclCreationResult::default(),
            };
            AclCreationResult::default()
                .with_error_code(code.code())
                .with_error_message(Some(str_bytes(msg)))
        })
        .collect();
    CreateAclsResponse::default().with_results(results)
}

pub fn describe_acls(
    broker: &Broker,
    ctx: &RequestContext,
    req: DescribeAclsRequest,
) -> DescribeAclsResponse {
    let fail = |code: ResponseError, msg: String| {
        DescribeAclsResponse::default()
            .with_error_code(code.code())
            .with_error_message(Some(str_bytes(msg)))
    };
    if let Some(code) = refusal(broker, ctx, Operation::Describe) {
        return fail(code, message(code));
    }
    let filter = match wire_filter!(req) {
        Ok(f) => f,
        Err(msg) => return fail(ResponseError::InvalidRequest, msg),
    };
    let mut by_resource: BTreeMap<(ResourceType, String, PatternType), Vec<AclDescription>> =
        BTreeMap::new();
    broker.with_acls(|acls| {
        for acl in acls.iter().filter(|a| filter.matches(a)) {
            by_resource
                .entry((acl.resource_type, acl.resource_name.clone(), acl.pattern))
                .or_default()
                .push(
                    AclDescription::default()
                        .with_principal(str_bytes(acl.principal.as_str()))
                        .with_host(str_bytes(acl.host.as_str()))
                        .with_operation(acl.operation.code())
                        .with_permission_type(acl.permission.code()),
                );
        }
    });
    DescribeAclsResponse::default().with_resources(
        by_resource
            .into_iter()
            .map(|((t, name, pattern), acls)| {
                DescribeAclsResource::default()
                    .with_resource_type(t.code())
                    .with_resource_name(str_bytes(name))
                    .with_pattern_type(pattern.code())
                    .with_acls(acls)
            })
            .collect(),
    )
}

pub async fn delete_acls(
    broker: &Broker,
    ctx: &RequestContext,
    req: DeleteAclsRequest,
) -> DeleteAclsResponse {
    let refused = refusal(broker, ctx, Operation::Alter);
    let filters = each(refused, &req.filters, |f| {
        wire_filter!(f).map_err(|m| (ResponseError::InvalidRequest, m))
    });
    let matched: Vec<Result<Vec<AclBinding>, (ResponseError, String)>> = broker.with_acls(|acls| {
        filters
            .into_iter()
            .map(|f| f.map(|f| acls.iter().filter(|a| f.matches(a)).cloned().collect()))
            .collect()
    });
    let remove: Vec<AclBinding> = matched.iter().flatten().flatten().cloned().collect();
    let stored = if remove.is_empty() {
        Ok(())
    } else {
        broker.change_acls(Vec::new(), remove).await
    };
    let results = matched
        .into_iter()
        .map(|outcome| {
            let fail = |code: ResponseError, msg: String| {
                DeleteAclsFilterResult::default()
                    .with_error_code(code.code())
                    .with_error_message(Some(str_bytes(msg)))
            };
            match (outcome, &stored) {
                (Err((code, msg)), _) => fail(code, msg),
                (Ok(_), Err(msg)) => fail(ResponseError::UnknownServerError, msg.clone()),
                (Ok(acls), Ok(())) => DeleteAclsFilterResult::default().with_matching_acls(
                    acls.into_iter()
                        .map(|a| {
                            DeleteAclsMatchingAcl::default()
                                .with_resource_type(a.resource_type.code())
                                .with_resource_name(str_bytes(a.resource_name))
                                .with_pattern_type(a.pattern.code())
                                .with_principal(str_bytes(a.principal))
                                .with_host(str_bytes(a.host))
                                .with_operation(a.operation.code())
                                .with_permission_type(a.permission.code())
                        })
                        .collect(),
                ),
            }
        })
        .collect();
    DeleteAclsResponse::default().with_filter_results(results)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::security::acl::AuthorizerSettings;

    #[test]
    fn acl_hosts_match_ipv4_clients_of_dual_stack_listeners() {
        let dir = tempfile::tempdir().unwrap();
        let mut broker = Broker::for_tests(dir.path());
        broker.authorizer = Authorizer::new(&AuthorizerSettings {
            enabled: true,
            ..Default::default()
        });
        broker
            .acls
            .update(|acls| {
                acls.insert(AclBinding {
                    resource_type: ResourceType::Topic,
                    resource_name: "t".into(),
                    pattern: PatternType::Literal,
                    principal: "User:alice".into(),
                    host: "10.0.0.1".into(),
                    operation: Operation::Read,
                    permission: Permission::Allow,
                });
            })
            .unwrap();
        let mut ctx = RequestContext::for_tests(4);
        ctx.principal = "User:alice".into();
        for (peer, allowed) in [
            ("[::ffff:10.0.0.1]:5000", true),
            ("10.0.0.1:5000", true),
            ("10.0.0.2:5000", false),
        ] {
            ctx.peer = peer.parse().unwrap();
            assert_eq!(
                broker.allowed(&ctx, Operation::Read, ResourceType::Topic, "t"),
                allowed,
                "{peer}"
            );
        }
        assert_eq!(
            broker.refusal(&ctx, Operation::Write, ResourceType::Topic, "t"),
            Some(ResponseError::TopicAuthorizationFailed)
        );
    }
}
