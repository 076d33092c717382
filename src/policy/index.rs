//! An equality index over a slice of policies. Operators write many
//! policies of one shape — forbid this label, allow that chain, permit this
//! team — each `when { <attribute> == <literal> }`. Cedar evaluates every
//! policy it is given, so with a thousand of them a decision costs a
//! thousand evaluations. The index groups such policies by attribute and
//! literal; a request evaluates the rest of the slice plus only the group
//! whose literal equals its own value. A policy left out has a condition
//! that is certainly false for the request (a defined attribute of another
//! value), so it could neither match nor fail: the decision is Cedar's.

use std::collections::HashMap;

use cedar_policy::{Policy, PolicySet};
use serde_json::Value;

/// A literal a policy compares an attribute with, as Cedar compares it
/// (`1 == "1"` is false: the variant is part of the key).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Scalar {
    /// A string.
    Str(String),
    /// A Long.
    Long(i64),
    /// A boolean.
    Bool(bool),
}

/// An attribute the engine can read off a request without Cedar.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Attr {
    /// `context.<record>.<field>`
    Context(String, String),
    /// `context.<attribute>`
    ContextTop(String),
    /// `resource.<attribute>`
    Resource(String),
    /// `principal.<attribute>`
    Principal(String),
}

/// How many policies must compare one attribute with literals before the
/// attribute is indexed: below that, evaluating them costs less than a
/// second pass of the authorizer.
const MIN_INDEXED: usize = 4;

/// A slice of a set: the policies every request evaluates, and per indexed
/// attribute, the policies by the literal their condition compares it with.
#[derive(Debug, Default)]
pub(super) struct Slice {
    /// Evaluated for every request.
    pub general: PolicySet,
    /// Evaluated only for a request whose attribute has that value.
    pub indexed: Vec<(Attr, HashMap<Scalar, PolicySet>)>,
}

impl Slice {
    /// Groups `policies`; only attributes `readable` says the engine can
    /// read for every request of this slice are indexed. `None` only if a
    /// policy set cannot be formed (duplicate ids: not in a valid set).
    pub fn build<'a>(policies: impl Iterator<Item = &'a Policy>, readable: impl Fn(&Attr) -> bool) -> Option<Slice> {
        let mut general = Vec::new();
        let mut by_path: HashMap<Attr, Vec<(Scalar, &'a Policy)>> = HashMap::new();
        for p in policies {
            match equality(p).filter(|(path, _)| readable(path)) {
                Some((path, value)) => by_path.entry(path).or_default().push((value, p)),
                None => general.push(p),
            }
        }
        let mut indexed = Vec::new();
        for (path, group) in by_path {
            if group.len() < MIN_INDEXED {
                general.extend(group.into_iter().map(|(_, p)| p));
                continue;
            }
            let mut buckets: HashMap<Scalar, Vec<&'a Policy>> = HashMap::new();
            for (value, p) in group {
                buckets.entry(value).or_default().push(p);
            }
            let mut sets = HashMap::new();
            for (value, ps) in buckets {
                sets.insert(value, PolicySet::from_policies(ps.into_iter().cloned()).ok()?);
            }
            indexed.push((path, sets));
        }
        // Any order gives the same decision; a fixed one gives stable tests.
        indexed.sort_by(|a, b| format!("{:?}", a.0).cmp(&format!("{:?}", b.0)));
        let general = PolicySet::from_policies(general.into_iter().cloned()).ok()?;
        Some(Slice { general, indexed })
    }
}

/// `(attribute, literal)` of a policy whose only condition is
/// `when { <attribute> == <literal> }` (either side), from its JSON form.
pub(super) fn equality(p: &Policy) -> Option<(Attr, Scalar)> {
    let json = p.to_json().ok()?;
    let conditions = json.get("conditions")?.as_array()?;
    let [only] = conditions.as_slice() else { return None };
    if only.get("kind")?.as_str()? != "when" {
        return None;
    }
    let eq = only.get("body")?.get("==")?;
    let (left, right) = (eq.get("left")?, eq.get("right")?);
    match (path(left), literal(right)) {
        (Some(p), Some(v)) => Some((p, v)),
        _ => Some((path(right)?, literal(left)?)),
    }
}

fn literal(v: &Value) -> Option<Scalar> {
    match v.get("Value")? {
        Value::String(s) => Some(Scalar::Str(s.clone())),
        Value::Bool(b) => Some(Scalar::Bool(*b)),
        Value::Number(n) => n.as_i64().map(Scalar::Long),
        _ => None,
    }
}

/// `(left, attr)` of an attribute access `left.attr` in a policy's JSON form.
pub(super) fn access(v: &Value) -> Option<(&Value, &str)> {
    let a = v.get(".")?;
    Some((a.get("left")?, a.get("attr")?.as_str()?))
}

/// The variable (`principal`, `context`, ...) a JSON expression names.
pub(super) fn var(v: &Value) -> Option<&str> {
    v.get("Var")?.as_str()
}

fn path(v: &Value) -> Option<Attr> {
    let (left, attr) = access(v)?;
    if let Some((inner, record)) = access(left) {
        return (var(inner)? == "context").then(|| Attr::Context(record.to_string(), attr.to_string()));
    }
    match var(left)? {
        "context" => Some(Attr::ContextTop(attr.to_string())),
        "resource" => Some(Attr::Resource(attr.to_string())),
        "principal" => Some(Attr::Principal(attr.to_string())),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use super::*;

    fn first(text: &str) -> Option<(Attr, Scalar)> {
        let set = PolicySet::from_str(text).expect("parses");
        let p = set.policies().next().expect("one policy");
        equality(p)
    }

    #[test]
    fn equalities_are_recognised_and_nothing_else() {
        let ctx = |r: &str, f: &str| Attr::Context(r.into(), f.into());
        assert_eq!(
            first(r#"forbid (principal, action, resource) when { context.typed_data.chain_id == 5 };"#),
            Some((ctx("typed_data", "chain_id"), Scalar::Long(5)))
        );
        assert_eq!(
            first(r#"forbid (principal, action, resource) when { "frozen" == resource.label };"#),
            Some((Attr::Resource("label".into()), Scalar::Str("frozen".into())))
        );
        assert_eq!(
            first(r#"permit (principal, action, resource) when { principal.team == "a" };"#),
            Some((Attr::Principal("team".into()), Scalar::Str("a".into())))
        );
        assert_eq!(
            first(r#"permit (principal, action, resource) when { context.controller_signed == true };"#),
            Some((Attr::ContextTop("controller_signed".into()), Scalar::Bool(true)))
        );
        for other in [
            r#"forbid (principal, action, resource) unless { context.dataset == "d" };"#,
            r#"forbid (principal, action, resource) when { context.dataset != "d" };"#,
            r#"forbid (principal, action, resource) when { context.dataset == "d" } when { true };"#,
            r#"forbid (principal, action, resource) when { context.dataset == "d" && true };"#,
            r#"forbid (principal, action, resource) when { resource.created_by == principal };"#,
            r#"forbid (principal, action, resource) when { context.session.scopes == ["a"] };"#,
            r#"forbid (principal, action, resource) when { resource.account.label == "x" };"#,
            r#"forbid (principal, action, resource);"#,
        ] {
            assert_eq!(first(other), None, "{other}");
        }
    }

    #[test]
    fn small_groups_stay_general_large_ones_are_bucketed() {
        let mut text = String::new();
        for i in 0..6 {
            text.push_str(&format!(
                "@id(\"c{i}\") forbid (principal, action, resource) when {{ context.dataset == \"d{}\" }};\n",
                i % 3
            ));
        }
        for i in 0..3 {
            text.push_str(&format!(
                "@id(\"t{i}\") permit (principal, action, resource) when {{ principal.team == \"t{i}\" }};\n"
            ));
        }
        text.push_str("@id(\"all\") permit (principal, action, resource);\n");
        let set = PolicySet::from_str(&text).expect("parses");
        let slice = Slice::build(set.policies(), |_| true).expect("valid");
        assert_eq!(slice.general.policies().count(), 4, "3 team policies + 1 unconditional");
        assert_eq!(slice.indexed.len(), 1);
        let (path, buckets) = &slice.indexed[0];
        assert_eq!(*path, Attr::ContextTop("dataset".into()));
        assert_eq!(buckets.len(), 3);
        assert_eq!(buckets[&Scalar::Str("d1".into())].policies().count(), 2);
        // Unreadable attributes are never indexed.
        let slice = Slice::build(set.policies(), |_| false).expect("valid");
        assert_eq!(slice.general.policies().count(), 10);
        assert!(slice.indexed.is_empty());
    }
}
