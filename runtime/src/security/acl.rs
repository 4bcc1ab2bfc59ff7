//! Kafka's authorizer model: an ACL binding allows or denies one principal, from one host, one
//! operation on the resources a pattern names (a literal name, `*`, or a name prefix). Deny
//! beats allow; super users are allowed everything; a resource no ACL names is open only when
//! `allow_everyone_if_no_acl_found` says so.

use std::collections::{BTreeSet, HashSet};
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// An enum with Kafka's wire codes and names.
macro_rules! kafka_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $code:literal, $text:literal;)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($variant),*
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),*];

            pub fn code(self) -> i8 {
                match self {
                    $($name::$variant => $code),*
                }
            }

            pub fn from_code(code: i8) -> Option<$name> {
                Self::ALL.iter().copied().find(|v| v.code() == code)
            }

            pub fn name(self) -> &'static str {
                match self {
                    $($name::$variant => $text),*
                }
            }

            /// By name in any case, with or without underscores (`TransactionalId`,
            /// `TRANSACTIONAL_ID`), as Kafka's tools and admin clients write them.
            pub fn parse(s: &str) -> Option<$name> {
                let norm = |x: &str| x.replace(['_', '-'], "").to_ascii_lowercase();
                Self::ALL.iter().copied().find(|v| norm(v.name()) == norm(s))
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

kafka_enum!(ResourceType {
    Topic = 2, "Topic";
    Group = 3, "Group";
    Cluster = 4, "Cluster";
    TransactionalId = 5, "TransactionalId";
    DelegationToken = 6, "DelegationToken";
    User = 7, "User";
});

kafka_enum!(PatternType {
    Literal = 3, "Literal";
    Prefixed = 4, "Prefixed";
});

kafka_enum!(Operation {
    All = 2, "All";
    Read = 3, "Read";
    Write = 4, "Write";
    Create = 5, "Create";
    Delete = 6, "Delete";
    Alter = 7, "Alter";
    Describe = 8, "Describe";
    ClusterAction = 9, "ClusterAction";
    DescribeConfigs = 10, "DescribeConfigs";
    AlterConfigs = 11, "AlterConfigs";
    IdempotentWrite = 12, "IdempotentWrite";
    CreateTokens = 13, "CreateTokens";
    DescribeTokens = 14, "DescribeTokens";
});

kafka_enum!(Permission {
    Deny = 2, "Deny";
    Allow = 3, "Allow";
});

/// Kafka's code for "any" in filters, and for "match" in pattern type filters.
pub const ANY: i8 = 1;
pub const MATCH: i8 = 2;
/// The one name of the cluster resource.
pub const CLUSTER_NAME: &str = "kafka-cluster";
/// A literal resource name, principal or host that stands for all of them.
pub const WILDCARD: &str = "*";
const WILDCARD_PRINCIPAL: &str = "User:*";

/// One ACL.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AclBinding {
    pub resource_type: ResourceType,
    pub resource_name: String,
    pub pattern: PatternType,
    /// `User:alice`, or `User:*` for every principal.
    pub principal: String,
    /// A client's IP address, or `*`.
    pub host: String,
    pub operation: Operation,
    pub permission: Permission,
}

/// Every ACL of a node or cluster.
pub type Acls = BTreeSet<AclBinding>;

impl AclBinding {
    /// Why Kafka would refuse to create this ACL (INVALID_REQUEST), if it would.
    pub fn validate(&self) -> Result<(), String> {
        if self.resource_name.is_empty() {
            return Err("the resource name must not be empty".into());
        }
        if self.resource_type == ResourceType::Cluster && self.resource_name != CLUSTER_NAME {
            return Err(format!(
                "the only valid name for the Cluster resource is {CLUSTER_NAME}"
            ));
        }
        match self.principal.split_once(':') {
            Some((kind, name)) if !kind.is_empty() && !name.is_empty() => {}
            _ => {
                return Err(format!(
                    "principal '{}' is not of the form Type:name (User:alice)",
                    self.principal
                ))
            }
        }
        if self.host != WILDCARD && self.host.parse::<IpAddr>().is_err() {
            return Err(format!(
                "host '{}' is neither an IP address nor *",
                self.host
            ));
        }
        Ok(())
    }

    /// Whether the pattern names this resource.
    fn covers(&self, resource_type: ResourceType, name: &str) -> bool {
        self.resource_type == resource_type
            && match self.pattern {
                PatternType::Literal => {
                    self.resource_name == name || self.resource_name == WILDCARD
                }
                PatternType::Prefixed => name.starts_with(&self.resource_name),
            }
    }

    fn applies_to(&self, principal: &str, host: &str) -> bool {
        (self.principal == principal || self.principal == WILDCARD_PRINCIPAL)
            && (self.host == WILDCARD || self.host == host)
    }
}

/// Whether an ACL for `granted` covers a check of `wanted`: All covers everything; reading,
/// writing, deleting or altering a resource includes describing it, altering its configs
/// includes describing them (as in Kafka).
fn implies(granted: Operation, wanted: Operation) -> bool {
    use Operation::*;
    granted == All
        || granted == wanted
        || (wanted == Describe && matches!(granted, Read | Write | Delete | Alter))
        || (wanted == DescribeConfigs && granted == AlterConfigs)
}

/// How a filter in DescribeAcls or DeleteAcls selects resource patterns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatternFilter {
    /// Patterns of any type with exactly the filter's name.
    Any,
    /// Patterns that cover the filter's name: the literal name, `*`, and prefixes of it.
    Match,
    Exactly(PatternType),
}

/// DescribeAcls' and DeleteAcls' filter; None fields match anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclFilter {
    pub resource_type: Option<ResourceType>,
    pub resource_name: Option<String>,
    pub pattern: PatternFilter,
    pub principal: Option<String>,
    pub host: Option<String>,
    pub operation: Option<Operation>,
    pub permission: Option<Permission>,
}

impl AclFilter {
    /// From the wire fields; an unknown code is an error (INVALID_REQUEST).
    pub fn from_kafka(
        resource_type: i8,
        resource_name: Option<&str>,
        pattern: i8,
        principal: Option<&str>,
        host: Option<&str>,
        operation: i8,
        permission: i8,
    ) -> Result<AclFilter, String> {
        fn any_or<T>(code: i8, what: &str, f: fn(i8) -> Option<T>) -> Result<Option<T>, String> {
            if code == ANY {
                return Ok(None);
            }
            f(code)
                .map(Some)
                .ok_or_else(|| format!("unknown {what} {code}"))
        }
        let pattern = match pattern {
            ANY => PatternFilter::Any,
            MATCH => PatternFilter::Match,
            code => PatternFilter::Exactly(
                PatternType::from_code(code)
                    .ok_or_else(|| format!("unknown pattern type {code}"))?,
            ),
        };
        Ok(AclFilter {
            resource_type: any_or(resource_type, "resource type", ResourceType::from_code)?,
            resource_name: resource_name.map(str::to_string),
            pattern,
            principal: principal.map(str::to_string),
            host: host.map(str::to_string),
            operation: any_or(operation, "operation", Operation::from_code)?,
            permission: any_or(permission, "permission type", Permission::from_code)?,
        })
    }

    pub fn matches(&self, acl: &AclBinding) -> bool {
        let pattern_matches = match (&self.pattern, &self.resource_name) {
            (PatternFilter::Exactly(p), _) if *p != acl.pattern => false,
            (_, None) => true,
            (PatternFilter::Any | PatternFilter::Exactly(_), Some(name)) => {
                *name == acl.resource_name
            }
            (PatternFilter::Match, Some(name)) => match acl.pattern {
                PatternType::Literal => *name == acl.resource_name || acl.resource_name == WILDCARD,
                PatternType::Prefixed => name.starts_with(&acl.resource_name),
            },
        };
        pattern_matches
            && self.resource_type.is_none_or(|t| t == acl.resource_type)
            && self.principal.as_ref().is_none_or(|p| *p == acl.principal)
            && self.host.as_ref().is_none_or(|h| *h == acl.host)
            && self.operation.is_none_or(|o| o == acl.operation)
            && self.permission.is_none_or(|p| p == acl.permission)
    }
}

/// The authorizer's settings (Kafka's authorizer.class.name, super.users and
/// allow.everyone.if.no.acl.found).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthorizerSettings {
    /// Check ACLs; off, every client may do everything and the ACL APIs answer
    /// SECURITY_DISABLED.
    pub enabled: bool,
    /// Principals allowed everything (`User:admin`, a certificate's `User:CN=...`).
    pub super_users: Vec<String>,
    /// Whether a resource that no ACL names is open to everyone.
    pub allow_everyone_if_no_acl_found: bool,
}

pub struct Authorizer {
    enabled: bool,
    super_users: HashSet<String>,
    allow_if_no_acl: bool,
}

impl Authorizer {
    pub fn new(settings: &AuthorizerSettings) -> Authorizer {
        Authorizer {
            enabled: settings.enabled,
            super_users: settings.super_users.iter().cloned().collect(),
            allow_if_no_acl: settings.allow_everyone_if_no_acl_found,
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Whether `principal`, connected from `host`, may do `operation` on the resource.
    pub fn authorize(
        &self,
        acls: &Acls,
        principal: &str,
        host: &str,
        operation: Operation,
        resource_type: ResourceType,
        name: &str,
    ) -> bool {
        if !self.enabled || self.super_users.contains(principal) {
            return true;
        }
        let mut named = false;
        let mut allowed = false;
        for acl in acls.iter().filter(|a| a.covers(resource_type, name)) {
            named = true;
            if !acl.applies_to(principal, host) {
                continue;
            }
            match acl.permission {
                Permission::Deny => {
                    if acl.operation == Operation::All || acl.operation == operation {
                        return false;
                    }
                }
                Permission::Allow => allowed |= implies(acl.operation, operation),
            }
        }
        allowed || (!named && self.allow_if_no_acl)
    }

    /// Whether the principal may do `operation` on at least one resource of the type (Kafka's
    /// authorizeByResourceType: an idempotent producer needs Write on some topic): an allowing
    /// ACL that no deny on every such resource overrides.
    pub fn authorize_any(
        &self,
        acls: &Acls,
        principal: &str,
        host: &str,
        operation: Operation,
        resource_type: ResourceType,
    ) -> bool {
        if !self.enabled || self.super_users.contains(principal) {
            return true;
        }
        let relevant = || {
            acls.iter()
                .filter(move |a| a.resource_type == resource_type && a.applies_to(principal, host))
        };
        let denied_everywhere = relevant().any(|a| {
            a.permission == Permission::Deny
                && (a.operation == Operation::All || a.operation == operation)
                && ((a.pattern == PatternType::Literal && a.resource_name == WILDCARD)
                    || (a.pattern == PatternType::Prefixed && a.resource_name.is_empty()))
        });
        if denied_everywhere {
            return false;
        }
        let allowed = relevant()
            .any(|a| a.permission == Permission::Allow && implies(a.operation, operation));
        allowed || (self.allow_if_no_acl && !acls.iter().any(|a| a.resource_type == resource_type))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(
        resource_type: ResourceType,
        name: &str,
        pattern: PatternType,
        principal: &str,
        operation: Operation,
        permission: Permission,
    ) -> AclBinding {
        AclBinding {
            resource_type,
            resource_name: name.into(),
            pattern,
            principal: principal.into(),
            host: WILDCARD.into(),
            operation,
            permission,
        }
    }

    fn authorizer(allow_if_no_acl: bool) -> Authorizer {
        Authorizer::new(&AuthorizerSettings {
            enabled: true,
            super_users: vec!["User:admin".into()],
            allow_everyone_if_no_acl_found: allow_if_no_acl,
        })
    }

    use Operation::*;
    use PatternType::*;
    use Permission::*;
    use ResourceType::*;

    #[test]
    fn prefixed_read_allows_reading_and_describing_but_not_writing() {
        let acls: Acls = [acl(Topic, "logs-", Prefixed, "User:alice", Read, Allow)].into();
        let a = authorizer(false);
        let check = |op, name| a.authorize(&acls, "User:alice", "10.0.0.1", op, Topic, name);
        assert!(check(Read, "logs-web"));
        assert!(check(Describe, "logs-web"));
        assert!(!check(Write, "logs-web"));
        assert!(!check(Read, "metrics"));
        assert!(!a.authorize(&acls, "User:bob", "10.0.0.1", Read, Topic, "logs-web"));
        assert!(a.authorize(&acls, "User:admin", "10.0.0.1", Delete, Topic, "metrics"));
    }

    #[test]
    fn deny_beats_allow_and_hosts_narrow_an_acl() {
        let mut deny_host = acl(Topic, "*", Literal, "User:*", All, Deny);
        deny_host.host = "10.0.0.9".into();
        let acls: Acls = [
            acl(Topic, "orders", Literal, "User:alice", All, Allow),
            acl(Topic, "orders", Literal, "User:alice", Write, Deny),
            deny_host,
        ]
        .into();
        let a = authorizer(false);
        assert!(a.authorize(&acls, "User:alice", "10.0.0.1", Read, Topic, "orders"));
        assert!(!a.authorize(&acls, "User:alice", "10.0.0.1", Write, Topic, "orders"));
        assert!(!a.authorize(&acls, "User:alice", "10.0.0.9", Read, Topic, "orders"));
    }

    #[test]
    fn resources_no_acl_names_follow_the_setting() {
        let acls: Acls = [acl(Group, "g1", Literal, "User:alice", Read, Allow)].into();
        assert!(!authorizer(false).authorize(&acls, "User:bob", "h", Read, Topic, "t"));
        assert!(authorizer(true).authorize(&acls, "User:bob", "h", Read, Topic, "t"));
        // g1 is named by an ACL, so it is closed to everyone else either way.
        assert!(!authorizer(true).authorize(&acls, "User:bob", "h", Read, Group, "g1"));
    }

    #[test]
    fn any_resource_of_a_type() {
        let a = authorizer(false);
        let acls: Acls = [acl(Topic, "t", Literal, "User:alice", Write, Allow)].into();
        assert!(a.authorize_any(&acls, "User:alice", "h", Write, Topic));
        assert!(!a.authorize_any(&acls, "User:alice", "h", Write, Group));
        assert!(!a.authorize_any(&acls, "User:bob", "h", Write, Topic));
        let mut denied = acls.clone();
        denied.insert(acl(Topic, "*", Literal, "User:alice", Write, Deny));
        assert!(!a.authorize_any(&denied, "User:alice", "h", Write, Topic));
    }

    #[test]
    fn filters_match_as_kafka_does() {
        let prefixed = acl(Topic, "logs-", Prefixed, "User:alice", Read, Allow);
        let wildcard = acl(Topic, "*", Literal, "User:bob", Write, Allow);
        let filter = |name: Option<&str>, pattern| {
            AclFilter::from_kafka(Topic.code(), name, pattern, None, None, ANY, ANY).unwrap()
        };
        assert!(filter(Some("logs-web"), MATCH).matches(&prefixed));
        assert!(filter(Some("logs-web"), MATCH).matches(&wildcard));
        assert!(!filter(Some("logs-web"), ANY).matches(&prefixed));
        assert!(filter(Some("logs-"), ANY).matches(&prefixed));
        assert!(!filter(Some("logs-"), Literal.code()).matches(&prefixed));
        assert!(filter(None, ANY).matches(&wildcard));
        assert!(AclFilter::from_kafka(9, None, ANY, None, None, ANY, ANY).is_err());
    }

    #[test]
    fn names_parse_as_kafka_tools_write_them() {
        assert_eq!(
            ResourceType::parse("TRANSACTIONAL_ID"),
            Some(TransactionalId)
        );
        assert_eq!(Operation::parse("describe-configs"), Some(DescribeConfigs));
        assert_eq!(Operation::parse("read"), Some(Read));
        assert_eq!(Permission::from_code(3), Some(Allow));
        let bad = acl(Cluster, "c", Literal, "alice", Alter, Allow);
        assert!(bad.validate().is_err());
    }
}
