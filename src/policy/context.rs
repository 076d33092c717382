//! What Cedar sees of a request besides its entities: the context record
//! (built from the handler's facts, only the fields the action's policies
//! read) and the scalar values the equality index compares, from one table
//! of fields so the two can never disagree.

use std::collections::{BTreeMap, BTreeSet};

use cedar_policy::{Context, Policy, RestrictedExpression};

use super::index::{access, var, Scalar};
use super::request::{MessageFacts, PaymentFacts, RequestContext, TransactionFacts, TypedDataFacts};
use super::PolicyError;

/// What of the context an action's policies read: only that is built per
/// request. Found in each policy's JSON form: `context.<record>.<field>`
/// reads one field; any other use of a record (`context.r has x`, the
/// record as a whole) reads all its fields; any other use of `context`
/// (`context has x`, the whole context) reads everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Reads {
    pub(super) all: bool,
    /// Record (or top-level attribute) -> the fields read; `None`: all.
    pub(super) records: BTreeMap<String, Option<BTreeSet<String>>>,
}

impl Reads {
    pub(super) const EVERYTHING: Reads = Reads {
        all: true,
        records: BTreeMap::new(),
    };

    pub(super) fn of<'a>(policies: impl Iterator<Item = &'a Policy>) -> Result<Reads, String> {
        let mut reads = Reads::default();
        for p in policies {
            let json = p.to_json().map_err(|e| e.to_string())?;
            reads.scan(&json);
        }
        Ok(reads)
    }

    fn scan(&mut self, v: &serde_json::Value) {
        use serde_json::Value;
        let is_context = |v: &Value| var(v) == Some("context");
        match v {
            Value::Object(map) => {
                if let Some((left, attr)) = access(v) {
                    if let Some((inner, record)) = access(left) {
                        if is_context(inner) {
                            let fields = self
                                .records
                                .entry(record.to_string())
                                .or_insert_with(|| Some(BTreeSet::new()));
                            if let Some(fields) = fields {
                                fields.insert(attr.to_string());
                            }
                            return;
                        }
                    }
                    if is_context(left) {
                        self.records.insert(attr.to_string(), None);
                        return;
                    }
                }
                if is_context(v) {
                    self.all = true;
                    return;
                }
                for value in map.values() {
                    self.scan(value);
                }
            }
            Value::Array(items) => {
                for item in items {
                    self.scan(item);
                }
            }
            _ => {}
        }
    }

    /// Whether the record (or top-level attribute) is read.
    pub(super) fn wants(&self, record: &str) -> bool {
        self.all || self.records.contains_key(record)
    }

    /// Whether a record's field is read.
    pub(super) fn wants_field(&self, record: &str, field: &str) -> bool {
        self.all
            || match self.records.get(record) {
                Some(None) => true,
                Some(Some(fields)) => fields.contains(field),
                None => false,
            }
    }
}

pub(super) fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_string())
}

pub(super) fn long<T: TryInto<i64>>(v: T) -> RestrictedExpression {
    RestrictedExpression::new_long(v.try_into().unwrap_or(i64::MAX))
}

pub(super) fn strings(v: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(v.iter().map(|s| string(s)))
}

/// UTC hour (0-23) and ISO weekday (1 = Monday) of unix seconds.
pub(super) fn hour_and_weekday(now: i64) -> (i64, i64) {
    let days = now.div_euclid(86_400);
    let hour = now.rem_euclid(86_400) / 3600;
    // 1970-01-01 was a Thursday (ISO 4).
    let weekday = (days + 3).rem_euclid(7) + 1;
    (hour, weekday)
}

/// The context's records and their fields, as the schema declares them.
pub(super) const RECORDS: &[(&str, &[&str])] = &[
    ("time", &["now", "hour", "weekday"]),
    ("session", &["active", "scopes", "ttl_seconds", "cap"]),
    (
        "typed_data",
        &[
            "present",
            "name",
            "version",
            "chain_id",
            "verifying_contract",
            "domain_id",
            "primary_type",
        ],
    ),
    ("payment", &["present", "amount", "currency", "manifest", "license"]),
    ("message", &["present", "alg", "length", "raw_digest"]),
    (
        "transaction",
        &["present", "chain_id", "to", "value", "value_is_zero", "selector"],
    ),
];

/// The context's attributes that are not records.
pub(super) const TOP: &[&str] = &["controller_signed", "dataset"];

/// One value of the context or of an entity, before it becomes Cedar's.
pub(super) enum Field<'a> {
    Bool(bool),
    Long(i64),
    Str(std::borrow::Cow<'a, str>),
    Set(&'a [String]),
}

pub(super) fn to_long<T: TryInto<i64>>(v: T) -> i64 {
    v.try_into().unwrap_or(i64::MAX)
}

impl Field<'_> {
    pub(super) fn expr(self) -> RestrictedExpression {
        match self {
            Field::Bool(b) => RestrictedExpression::new_bool(b),
            Field::Long(v) => RestrictedExpression::new_long(v),
            Field::Str(s) => RestrictedExpression::new_string(s.into_owned()),
            Field::Set(v) => strings(v),
        }
    }

    pub(super) fn scalar(self) -> Option<Scalar> {
        match self {
            Field::Bool(b) => Some(Scalar::Bool(b)),
            Field::Long(v) => Some(Scalar::Long(v)),
            Field::Str(s) => Some(Scalar::Str(s.into_owned())),
            Field::Set(_) => None,
        }
    }
}

/// `context.<record>.<name>` of a request (absent facts read as the empty
/// record of the schema's shape); `None` for a field the schema lacks.
pub(super) fn context_field<'a>(c: &'a RequestContext, record: &str, name: &str) -> Option<Field<'a>> {
    use std::borrow::Cow::{Borrowed, Owned};
    Some(match (record, name) {
        ("time", "now") => Field::Long(c.now),
        ("time", "hour") => Field::Long(hour_and_weekday(c.now).0),
        ("time", "weekday") => Field::Long(hour_and_weekday(c.now).1),
        ("session", "active") => Field::Bool(c.session.active),
        ("session", "scopes") => Field::Set(&c.session.scopes),
        ("session", "ttl_seconds") => Field::Long(to_long(c.session.ttl_seconds)),
        ("session", "cap") => Field::Long(to_long(c.session.cap)),
        ("typed_data", "present") => Field::Bool(c.typed_data.is_some()),
        ("typed_data", "domain_id") => Field::Str(match &c.typed_data {
            Some(td) => Owned(td.domain_id()),
            None => Borrowed(""),
        }),
        ("typed_data", "chain_id") => Field::Long(match &c.typed_data {
            Some(td) => to_long(td.chain_id.parse::<u128>().unwrap_or(0)),
            None => 0,
        }),
        ("typed_data", f) => {
            let td = c.typed_data.as_ref();
            let s = |get: fn(&TypedDataFacts) -> &str| Field::Str(Borrowed(td.map(get).unwrap_or_default()));
            match f {
                "name" => s(|t| &t.name),
                "version" => s(|t| &t.version),
                "verifying_contract" => s(|t| &t.verifying_contract),
                "primary_type" => s(|t| &t.primary_type),
                _ => return None,
            }
        }
        ("payment", "present") => Field::Bool(c.payment.is_some()),
        ("payment", "amount") => Field::Long(c.payment.as_ref().map(|p| to_long(p.amount)).unwrap_or(0)),
        ("payment", f) => {
            let pay = c.payment.as_ref();
            let s = |get: fn(&PaymentFacts) -> &str| Field::Str(Borrowed(pay.map(get).unwrap_or_default()));
            match f {
                "currency" => s(|p| &p.currency),
                "manifest" => s(|p| &p.manifest),
                "license" => s(|p| &p.license),
                _ => return None,
            }
        }
        ("message", "present") => Field::Bool(c.message.is_some()),
        ("message", "alg") => Field::Str(Borrowed(c.message.as_ref().map(|m| m.alg).unwrap_or_default())),
        ("message", "length") => Field::Long(c.message.as_ref().map(|m| to_long(m.length)).unwrap_or(0)),
        ("message", "raw_digest") => Field::Bool(c.message.as_ref().is_some_and(MessageFacts::raw_digest)),
        ("transaction", "present") => Field::Bool(c.transaction.is_some()),
        ("transaction", "chain_id") => Field::Long(c.transaction.as_ref().map(|t| to_long(t.chain_id)).unwrap_or(0)),
        ("transaction", "value_is_zero") => Field::Bool(
            c.transaction
                .as_ref()
                .is_none_or(|t| t.value.bytes().all(|b| b == b'0')),
        ),
        ("transaction", f) => {
            let tx = c.transaction.as_ref();
            let s = |get: fn(&TransactionFacts) -> &str| Field::Str(Borrowed(tx.map(get).unwrap_or_default()));
            match f {
                "to" => s(|t| &t.to),
                "value" => s(|t| &t.value),
                "selector" => s(|t| &t.selector),
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// `context.<name>` for the attributes that are not records.
pub(super) fn context_top<'a>(c: &'a RequestContext, name: &str) -> Option<Field<'a>> {
    match name {
        "controller_signed" => Some(Field::Bool(c.controller_signed)),
        "dataset" => Some(Field::Str(std::borrow::Cow::Borrowed(&c.dataset))),
        _ => None,
    }
}

/// The request context: what `reads` names (everything for the schema
/// check in debug builds), each record to the schema's shape.
pub(super) fn context(c: &RequestContext, reads: &Reads) -> Result<Context, PolicyError> {
    let mut pairs: Vec<(String, RestrictedExpression)> = Vec::with_capacity(RECORDS.len() + TOP.len());
    for (record, fields) in RECORDS {
        if !reads.wants(record) {
            continue;
        }
        let mut values = Vec::with_capacity(fields.len());
        for name in fields.iter().filter(|f| reads.wants_field(record, f)) {
            let value = context_field(c, record, name)
                .ok_or_else(|| PolicyError::Request(format!("no context field {record}.{name}")))?;
            values.push((name.to_string(), value.expr()));
        }
        let value = RestrictedExpression::new_record(values).map_err(|e| PolicyError::Request(e.to_string()))?;
        pairs.push((record.to_string(), value));
    }
    for name in TOP.iter().filter(|t| reads.wants(t)) {
        let value = context_top(c, name).ok_or_else(|| PolicyError::Request(format!("no context field {name}")))?;
        pairs.push((name.to_string(), value.expr()));
    }
    Context::from_pairs(pairs).map_err(|e| PolicyError::Request(e.to_string()))
}

/// An account's scalar attributes, as its entity carries them.
pub(super) fn account_field<'a>(a: &'a crate::store::AccountRecord, name: &str) -> Option<Field<'a>> {
    match name {
        "label" => Some(Field::Str(std::borrow::Cow::Borrowed(
            a.label.as_deref().unwrap_or_default(),
        ))),
        "controller" => Some(Field::Str(std::borrow::Cow::Owned(a.controller.to_ascii_lowercase()))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::str::FromStr as _;

    use cedar_policy::PolicySet;

    use super::*;

    fn reads(text: &str) -> Reads {
        let set = PolicySet::from_str(text).expect("parses");
        Reads::of(set.policies()).expect("json")
    }

    #[test]
    fn reads_names_fields_records_or_everything() {
        let r = reads(r#"permit (principal, action, resource) when { context.typed_data.domain_id == "x" };"#);
        assert!(!r.all);
        assert!(r.wants_field("typed_data", "domain_id"));
        assert!(!r.wants_field("typed_data", "name"));
        assert!(!r.wants("session"));
        let r = reads(r#"permit (principal, action, resource) when { context.session has scopes };"#);
        assert!(r.wants_field("session", "scopes") && r.wants_field("session", "cap"));
        assert!(!r.wants("payment"));
        let r = reads(r#"permit (principal, action, resource) when { context has payment };"#);
        assert!(r.all && r.wants_field("message", "alg"));
        let r = reads(
            r#"permit (principal, action, resource) when { context.dataset == "d" && context["time"].hour > 3 };"#,
        );
        assert!(r.wants("dataset") && r.wants_field("time", "hour") && !r.wants_field("time", "now"));
        let r = reads(r#"@reason("context.payment is not read here") permit (principal, action, resource);"#);
        assert_eq!(r, Reads::default());
    }
}
