//! `weir acl add|list|remove`: the authorizer's ACLs, through Kafka's own ACL APIs (so the
//! same works against any node of a cluster, and against Kafka).

use anyhow::{anyhow, bail, Result};
use clap::{Args, Subcommand};
use kafka_protocol::messages::create_acls_request::AclCreation;
use kafka_protocol::messages::delete_acls_request::DeleteAclsFilter;
use kafka_protocol::messages::{CreateAclsRequest, DeleteAclsRequest, DescribeAclsRequest};

use super::{check_code, ConnectArgs};
use crate::client::Connection;
use crate::kafka::str_bytes;
use crate::security::acl::{
    Operation, PatternType, Permission, ResourceType, ANY, CLUSTER_NAME, MATCH, WILDCARD,
};

#[derive(Subcommand)]
pub enum AclCommand {
    /// Allow (or deny) a principal operations on a resource.
    Add {
        /// Who: User:alice, User:CN=client,O=example (a certificate), or User:* for everyone
        #[arg(long)]
        principal: String,
        /// Read, Write, Create, Delete, Alter, Describe, ClusterAction, DescribeConfigs,
        /// AlterConfigs, IdempotentWrite or All; repeatable
        #[arg(long = "operation", required = true)]
        operations: Vec<String>,
        /// The client's IP address, or * for any
        #[arg(long, default_value = WILDCARD)]
        host: String,
        /// Deny instead of allow (a deny beats every allow)
        #[arg(long)]
        deny: bool,
        #[command(flatten)]
        resource: ResourceArgs,
        /// The name is a prefix: the ACL covers every resource whose name starts with it
        #[arg(long)]
        prefixed: bool,
    },
    /// The ACLs, all or those matching the filter.
    List {
        #[command(flatten)]
        filter: FilterArgs,
    },
    /// Remove the ACLs matching the filter.
    Remove {
        #[command(flatten)]
        filter: FilterArgs,
        /// Remove every ACL (needed when no filter is given)
        #[arg(long)]
        all: bool,
    },
}

/// The resource an ACL names; at most one.
#[derive(Args, Default)]
#[group(multiple = false)]
pub struct ResourceArgs {
    #[arg(long)]
    topic: Option<String>,
    #[arg(long)]
    group: Option<String>,
    #[arg(long)]
    transactional_id: Option<String>,
    /// The cluster itself (creating topics, managing users and ACLs, ...)
    #[arg(long)]
    cluster: bool,
}

impl ResourceArgs {
    fn get(&self) -> Option<(ResourceType, &str)> {
        let named = [
            (ResourceType::Topic, &self.topic),
            (ResourceType::Group, &self.group),
            (ResourceType::TransactionalId, &self.transactional_id),
        ];
        named
            .into_iter()
            .find_map(|(t, n)| n.as_deref().map(|n| (t, n)))
            .or(self
                .cluster
                .then_some((ResourceType::Cluster, CLUSTER_NAME)))
    }
}

#[derive(Args)]
pub struct FilterArgs {
    #[arg(long)]
    principal: Option<String>,
    #[arg(long)]
    host: Option<String>,
    #[arg(long)]
    operation: Option<String>,
    #[command(flatten)]
    resource: ResourceArgs,
    /// How a resource name selects patterns: any (exactly that name, literal or prefixed),
    /// match (every ACL that applies to that resource: its name, * and its prefixes), literal
    /// or prefixed
    #[arg(long, default_value = "any")]
    pattern: String,
}

impl FilterArgs {
    fn is_empty(&self) -> bool {
        self.principal.is_none()
            && self.host.is_none()
            && self.operation.is_none()
            && self.resource.get().is_none()
    }

    /// The resource type, name, pattern type and operation as the wire codes.
    fn codes(&self) -> Result<(i8, Option<String>, i8, i8)> {
        let pattern = match self.pattern.to_ascii_lowercase().as_str() {
            "any" => ANY,
            "match" => MATCH,
            other => PatternType::parse(other)
                .ok_or_else(|| {
                    anyhow!("unknown pattern '{other}': any, match, literal or prefixed")
                })?
                .code(),
        };
        let operation = match &self.operation {
            None => ANY,
            Some(o) => operation(o)?.code(),
        };
        let (kind, name) = match self.resource.get() {
            Some((t, n)) => (t.code(), Some(n.to_string())),
            None => (ANY, None),
        };
        Ok((kind, name, pattern, operation))
    }
}

/// DescribeAclsRequest and DeleteAcls' filters have the same fields: sets them from the
/// command line's filter (any permission).
macro_rules! with_filter {
    ($message:expr, $filter:expr) => {{
        let (kind, name, pattern, op) = $filter.codes()?;
        $message
            .with_resource_type_filter(kind)
            .with_resource_name_filter(name.map(str_bytes))
            .with_pattern_type_filter(pattern)
            .with_principal_filter($filter.principal.clone().map(str_bytes))
            .with_host_filter($filter.host.clone().map(str_bytes))
            .with_operation(op)
            .with_permission_type(ANY)
    }};
}

fn operation(name: &str) -> Result<Operation> {
    Operation::parse(name).ok_or_else(|| {
        let known: Vec<&str> = Operation::ALL.iter().map(|o| o.name()).collect();
        anyhow!("unknown operation '{name}': {}", known.join(", "))
    })
}

pub async fn run(cmd: AclCommand, conn: &ConnectArgs) -> Result<()> {
    let mut c = Connection::connect(&conn.brokers).await?;
    match cmd {
        AclCommand::Add {
            principal,
            operations,
            host,
            deny,
            resource,
            prefixed,
        } => {
            let Some((kind, name)) = resource.get() else {
                bail!("name the resource: --topic, --group, --transactional-id or --cluster");
            };
            let pattern = if prefixed {
                PatternType::Prefixed
            } else {
                PatternType::Literal
            };
            let permission = if deny {
                Permission::Deny
            } else {
                Permission::Allow
            };
            let creations = operations
                .iter()
                .map(|o| {
                    Ok(AclCreation::default()
                        .with_resource_type(kind.code())
                        .with_resource_name(str_bytes(name))
                        .with_resource_pattern_type(pattern.code())
                        .with_principal(str_bytes(principal.as_str()))
                        .with_host(str_bytes(host.as_str()))
                        .with_operation(operation(o)?.code())
                        .with_permission_type(permission.code()))
                })
                .collect::<Result<Vec<_>>>()?;
            let resp = c
                .call(&CreateAclsRequest::default().with_creations(creations))
                .await?;
            for r in resp.results {
                check_code(r.error_code, r.error_message.as_deref())?;
            }
            println!(
                "{permission} {principal} from {host}: {} on {kind} {name} ({pattern})",
                operations.join(", ")
            );
        }
        AclCommand::List { filter } => {
            let resp = c
                .call(&with_filter!(DescribeAclsRequest::default(), filter))
                .await?;
            check_code(resp.error_code, resp.error_message.as_deref())?;
            println!("PRINCIPAL\tHOST\tPERMISSION\tOPERATION\tRESOURCE\tPATTERN\tNAME");
            let name_of = |code, f: fn(i8) -> Option<&'static str>| {
                f(code).map_or_else(|| code.to_string(), str::to_string)
            };
            for r in resp.resources {
                for a in r.acls {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}\t{}",
                        a.principal.as_str(),
                        a.host.as_str(),
                        name_of(a.permission_type, |c| Permission::from_code(c)
                            .map(|p| p.name())),
                        name_of(a.operation, |c| Operation::from_code(c).map(|o| o.name())),
                        name_of(r.resource_type, |c| ResourceType::from_code(c)
                            .map(|t| t.name())),
                        name_of(r.pattern_type, |c| PatternType::from_code(c)
                            .map(|p| p.name())),
                        r.resource_name.as_str(),
                    );
                }
            }
        }
        AclCommand::Remove { filter, all } => {
            if filter.is_empty() && !all {
                bail!("give a filter (--principal, --topic, ...) or --all to remove every ACL");
            }
            let resp = c
                .call(
                    &DeleteAclsRequest::default()
                        .with_filters(vec![with_filter!(DeleteAclsFilter::default(), filter)]),
                )
                .await?;
            let mut removed = 0;
            for r in resp.filter_results {
                check_code(r.error_code, r.error_message.as_deref())?;
                removed += r.matching_acls.len();
            }
            println!("{removed} ACL(s) removed");
        }
    }
    Ok(())
}
