//! The loaded policy set (schema, policies, client mapping), validated as a
//! whole, and the pure decision function over it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr as _;

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet,
    Request, RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde::Deserialize;

use super::limits::{Limits, LIMITS_FILE};
use super::request::{MessageFacts, PaymentFacts, PolicyRequest, RequestContext, Resource, TypedDataFacts};
use super::{Action, Decision, PolicyError};

/// The schema's file name in a policy folder.
pub const SCHEMA_FILE: &str = "schema.cedarschema";
/// The client mapping's file name in a policy folder.
pub const CLIENTS_FILE: &str = "clients.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientsFile {
    #[serde(default)]
    client: Vec<ClientEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientEntry {
    identity: String,
    #[serde(default)]
    roles: Vec<String>,
    #[serde(default)]
    team: String,
}

#[derive(Debug, Clone, Default)]
struct ClientInfo {
    roles: Vec<EntityUid>,
    team: String,
}

/// A validated policy set: schema, policies (each with its `@id`), client roles.
#[derive(Debug)]
pub struct Policies {
    schema: Schema,
    set: PolicySet,
    /// Per action, the policies whose action scope can match it: a policy
    /// that cannot match an action cannot change its decision, and Cedar
    /// evaluates every policy of the set it is given.
    by_action: HashMap<&'static str, PolicySet>,
    clients: HashMap<String, ClientInfo>,
    actions: HashMap<&'static str, Entity>,
    reasons: BTreeMap<String, String>,
    names: Names,
    authorizer: Authorizer,
    limits: Limits,
}

fn type_name(name: &str) -> Result<EntityTypeName, PolicyError> {
    EntityTypeName::from_str(name).map_err(|e| PolicyError::Request(e.to_string()))
}

/// The entity type names requests use, parsed once per set (parsing a name
/// runs Cedar's parser: too slow for every request).
#[derive(Debug)]
struct Names {
    client: EntityTypeName,
    account: EntityTypeName,
    session: EntityTypeName,
    service: EntityTypeName,
}

impl Names {
    fn new() -> Result<Names, PolicyError> {
        Ok(Names {
            client: type_name("Keyward::Client")?,
            account: type_name("Keyward::Account")?,
            session: type_name("Keyward::Session")?,
            service: type_name("Keyward::Service")?,
        })
    }

    fn client(&self, identity: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.client.clone(), EntityId::new(identity))
    }
}

fn uid(ty: &str, id: &str) -> Result<EntityUid, PolicyError> {
    Ok(EntityUid::from_type_name_and_id(type_name(ty)?, EntityId::new(id)))
}

/// `line L, column C` of a byte offset.
fn position(src: &str, offset: usize) -> String {
    let before = src.get(..offset.min(src.len())).unwrap_or(src);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map(|l| l.chars().count()).unwrap_or(0) + 1;
    format!("line {line}, column {column}")
}

/// An error with the source positions Cedar labels, one line.
fn describe(e: &dyn miette::Diagnostic, src: &str) -> String {
    let mut out = e.to_string();
    if let Some(help) = e.help() {
        out.push_str(&format!(" ({help})"));
    }
    if let Some(label) = e.labels().and_then(|mut l| l.next()) {
        out = format!("{}: {out}", position(src, label.offset()));
    }
    out
}

fn invalid(path: &Path, reason: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

impl Policies {
    /// Loads `schema.cedarschema`, `clients.toml` and every `*.cedar` of a folder.
    pub fn load_dir(dir: &Path) -> Result<Policies, PolicyError> {
        let read = |p: PathBuf| {
            std::fs::read_to_string(&p)
                .map(|t| (p.clone(), t))
                .map_err(|source| PolicyError::Read { path: p, source })
        };
        let schema = read(dir.join(SCHEMA_FILE))?;
        let clients = read(dir.join(CLIENTS_FILE))?;
        let limits_path = dir.join(LIMITS_FILE);
        let limits = if limits_path.exists() {
            Some(read(limits_path)?)
        } else {
            None
        };
        let entries = std::fs::read_dir(dir).map_err(|source| PolicyError::Read {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut files = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| PolicyError::Read {
                path: dir.to_path_buf(),
                source,
            })?;
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "cedar") && path.is_file() {
                files.push(read(path)?);
            }
        }
        files.sort();
        if files.is_empty() {
            return Err(invalid(dir, "no *.cedar policy file"));
        }
        Policies::from_sources(&schema, &files, &clients, limits.as_ref())
    }

    /// Builds a set from texts: `(path, text)` of the schema, the policy
    /// files, the clients file and the limits file (none: no limits).
    pub fn from_sources(
        schema: &(PathBuf, String),
        policies: &[(PathBuf, String)],
        clients: &(PathBuf, String),
        limits: Option<&(PathBuf, String)>,
    ) -> Result<Policies, PolicyError> {
        let (schema_path, schema_text) = schema;
        let (parsed_schema, _warnings) =
            Schema::from_cedarschema_str(schema_text).map_err(|e| invalid(schema_path, describe(&e, schema_text)))?;
        let mut set = PolicySet::new();
        let mut reasons = BTreeMap::new();
        let mut origin: HashMap<String, PathBuf> = HashMap::new();
        for (path, text) in policies {
            let file_set = PolicySet::from_str(text).map_err(|e| invalid(path, describe(&e, text)))?;
            if file_set.templates().next().is_some() {
                return Err(invalid(path, "templates are not supported: write plain policies"));
            }
            for policy in file_set.policies() {
                let Some(id) = policy.annotation("id") else {
                    let shown = policy.to_string();
                    let first = shown
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .chars()
                        .take(60)
                        .collect::<String>();
                    return Err(invalid(
                        path,
                        format!("every policy needs an @id(\"...\") annotation; this one has none: `{first}`"),
                    ));
                };
                if id.is_empty() || id.chars().any(|c| c.is_control() || c == ',') {
                    return Err(invalid(
                        path,
                        format!("policy id {id:?} must be non-empty without commas"),
                    ));
                }
                if let Some(first) = origin.get(id) {
                    return Err(invalid(
                        path,
                        format!("policy id {id:?} is also used in {}", first.display()),
                    ));
                }
                origin.insert(id.to_string(), path.clone());
                if let Some(r) = policy.annotation("reason") {
                    reasons.insert(id.to_string(), r.to_string());
                }
                set.add(policy.new_id(PolicyId::new(id)))
                    .map_err(|e| invalid(path, e.to_string()))?;
            }
        }
        let result = Validator::new(parsed_schema.clone()).validate(&set, ValidationMode::Strict);
        if !result.validation_passed() {
            let mut reasons = Vec::new();
            for e in result.validation_errors() {
                let id = e.policy_id().to_string();
                let (path, text) = origin
                    .get(&id)
                    .and_then(|p| policies.iter().find(|(q, _)| q == p))
                    .map(|(p, t)| (p.display().to_string(), t.as_str()))
                    .unwrap_or_default();
                reasons.push(format!("{path}: policy {id}: {}", describe(e, text)));
            }
            let first = policies.first().map(|(p, _)| p.as_path()).unwrap_or(schema_path);
            return Err(invalid(
                first.parent().unwrap_or(first),
                format!("does not validate against the schema: {}", reasons.join("; ")),
            ));
        }
        let clients = parse_clients(clients)?;
        let limits = limits
            .map(|(path, text)| Limits::parse(path, text))
            .transpose()?
            .unwrap_or_default();
        let action_entities = parsed_schema
            .action_entities()
            .map_err(|e| invalid(schema_path, e.to_string()))?;
        let mut actions = HashMap::new();
        let mut by_action = HashMap::new();
        for a in Action::ALL {
            let id = uid("Keyward::Action", a.name())?;
            let entity = action_entities
                .get(&id)
                .cloned()
                .ok_or_else(|| invalid(schema_path, format!("the schema has no action {}", a.name())))?;
            let mut within: HashSet<EntityUid> =
                action_entities.ancestors(&id).into_iter().flatten().cloned().collect();
            within.insert(id.clone());
            let subset = PolicySet::from_policies(
                set.policies()
                    .filter(|p| match p.action_constraint() {
                        ActionConstraint::Eq(x) => x == id,
                        ActionConstraint::In(xs) => xs.iter().any(|x| within.contains(x)),
                        // Any, and whatever a later Cedar adds: kept.
                        _ => true,
                    })
                    .cloned(),
            )
            .map_err(|e| invalid(schema_path, e.to_string()))?;
            actions.insert(a.name(), entity);
            by_action.insert(a.name(), subset);
        }
        Ok(Policies {
            schema: parsed_schema,
            set,
            by_action,
            clients,
            actions,
            reasons,
            names: Names::new()?,
            authorizer: Authorizer::new(),
            limits,
        })
    }

    /// Whether the schema declares `action` (every action does, or the set would not load).
    pub fn declares(&self, action: Action) -> bool {
        self.actions.contains_key(action.name())
    }

    /// How many policies the set holds.
    pub fn len(&self) -> usize {
        self.set.policies().count()
    }

    /// Whether the set holds no policy.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The limits applied after the policies allowed a request.
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// The `@reason` annotation of a policy.
    pub fn reason(&self, id: &str) -> Option<&str> {
        self.reasons.get(id).map(String::as_str)
    }

    /// The roles a client identity holds.
    pub fn roles(&self, identity: &str) -> Vec<String> {
        self.clients
            .get(identity)
            .map(|c| c.roles.iter().map(|r| r.id().unescaped().to_string()).collect())
            .unwrap_or_default()
    }
}

fn parse_clients((path, text): &(PathBuf, String)) -> Result<HashMap<String, ClientInfo>, PolicyError> {
    let file: ClientsFile = toml::from_str(text).map_err(|e| invalid(path, e.to_string()))?;
    let mut out = HashMap::new();
    for c in file.client {
        if c.identity.is_empty() {
            return Err(invalid(path, "a client has an empty identity"));
        }
        let mut roles = Vec::new();
        for r in &c.roles {
            if r.is_empty() || r.chars().any(char::is_control) {
                return Err(invalid(
                    path,
                    format!("client {}: role {r:?} is not a name", c.identity),
                ));
            }
            roles.push(uid("Keyward::Role", r)?);
        }
        if out
            .insert(c.identity.clone(), ClientInfo { roles, team: c.team })
            .is_some()
        {
            return Err(invalid(path, format!("client {} is listed twice", c.identity)));
        }
    }
    Ok(out)
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_string())
}

fn long<T: TryInto<i64>>(v: T) -> RestrictedExpression {
    RestrictedExpression::new_long(v.try_into().unwrap_or(i64::MAX))
}

fn record(pairs: Vec<(&str, RestrictedExpression)>) -> Result<RestrictedExpression, PolicyError> {
    RestrictedExpression::new_record(pairs.into_iter().map(|(k, v)| (k.to_string(), v)))
        .map_err(|e| PolicyError::Request(e.to_string()))
}

fn strings(v: &[String]) -> RestrictedExpression {
    RestrictedExpression::new_set(v.iter().map(|s| string(s)))
}

/// UTC hour (0-23) and ISO weekday (1 = Monday) of unix seconds.
fn hour_and_weekday(now: i64) -> (i64, i64) {
    let days = now.div_euclid(86_400);
    let hour = now.rem_euclid(86_400) / 3600;
    // 1970-01-01 was a Thursday (ISO 4).
    let weekday = (days + 3).rem_euclid(7) + 1;
    (hour, weekday)
}

fn context(c: &RequestContext) -> Result<Context, PolicyError> {
    let (hour, weekday) = hour_and_weekday(c.now);
    // Absent facts are empty records of the schema's shape (no clones of
    // the request's facts on the signing path).
    let (no_td, no_pay, no_msg) = (
        TypedDataFacts::default(),
        PaymentFacts::default(),
        MessageFacts::default(),
    );
    let td = c.typed_data.as_ref().unwrap_or(&no_td);
    let chain_id = td.chain_id.parse::<u128>().unwrap_or(0);
    let pay = c.payment.as_ref().unwrap_or(&no_pay);
    let msg = c.message.as_ref().unwrap_or(&no_msg);
    let pairs = vec![
        (
            "time",
            record(vec![
                ("now", long(c.now)),
                ("hour", long(hour)),
                ("weekday", long(weekday)),
            ])?,
        ),
        (
            "session",
            record(vec![
                ("active", RestrictedExpression::new_bool(c.session.active)),
                ("scopes", strings(&c.session.scopes)),
                ("ttl_seconds", long(c.session.ttl_seconds)),
                ("cap", long(c.session.cap)),
            ])?,
        ),
        (
            "typed_data",
            record(vec![
                ("present", RestrictedExpression::new_bool(c.typed_data.is_some())),
                ("name", string(&td.name)),
                ("version", string(&td.version)),
                ("chain_id", long(chain_id)),
                ("verifying_contract", string(&td.verifying_contract)),
                (
                    "domain_id",
                    string(&if c.typed_data.is_some() {
                        td.domain_id()
                    } else {
                        String::new()
                    }),
                ),
                ("primary_type", string(&td.primary_type)),
            ])?,
        ),
        (
            "payment",
            record(vec![
                ("present", RestrictedExpression::new_bool(c.payment.is_some())),
                ("amount", long(pay.amount)),
                ("currency", string(&pay.currency)),
                ("manifest", string(&pay.manifest)),
                ("license", string(&pay.license)),
            ])?,
        ),
        (
            "message",
            record(vec![
                ("present", RestrictedExpression::new_bool(c.message.is_some())),
                ("alg", string(msg.alg)),
                ("length", long(msg.length)),
                ("raw_digest", RestrictedExpression::new_bool(msg.raw_digest())),
            ])?,
        ),
        ("controller_signed", RestrictedExpression::new_bool(c.controller_signed)),
        ("dataset", string(&c.dataset)),
    ];
    Context::from_pairs(pairs.into_iter().map(|(k, v)| (k.to_string(), v)))
        .map_err(|e| PolicyError::Request(e.to_string()))
}

fn account_entity(n: &Names, a: &crate::store::AccountRecord) -> Result<Entity, PolicyError> {
    let allowed = a
        .allowed
        .iter()
        .map(|x| RestrictedExpression::new_entity_uid(n.client(x)))
        .collect::<Vec<_>>();
    let attrs = HashMap::from([
        ("label".to_string(), string(a.label.as_deref().unwrap_or_default())),
        ("controller".to_string(), string(&a.controller.to_ascii_lowercase())),
        (
            "created_by".to_string(),
            RestrictedExpression::new_entity_uid(n.client(&a.created_by)),
        ),
        ("allowed".to_string(), RestrictedExpression::new_set(allowed)),
    ]);
    let id = EntityUid::from_type_name_and_id(n.account.clone(), EntityId::new(&a.id));
    Entity::new(id, attrs, HashSet::new()).map_err(|e| PolicyError::Request(e.to_string()))
}

fn build(req: &PolicyRequest<'_>, p: &Policies) -> Result<(Request, Entities), PolicyError> {
    let action_entity = p
        .actions
        .get(req.action.name())
        .ok_or_else(|| PolicyError::Request(format!("no action entity for {}", req.action.name())))?;
    let action = action_entity.uid();
    let n = &p.names;
    let principal = n.client(req.principal);
    let info = p.clients.get(req.principal).cloned().unwrap_or_default();
    let mut entities = vec![action_entity.clone()];
    for r in &info.roles {
        entities.push(Entity::new_no_attrs(r.clone(), HashSet::new()));
    }
    let client = Entity::new(
        principal.clone(),
        HashMap::from([
            ("identity".to_string(), string(req.principal)),
            ("team".to_string(), string(&info.team)),
        ]),
        info.roles.iter().cloned().collect(),
    )
    .map_err(|e| PolicyError::Request(e.to_string()))?;
    entities.push(client);
    let resource = match req.resource {
        Resource::Service => {
            let id = EntityUid::from_type_name_and_id(n.service.clone(), EntityId::new("keyward"));
            entities.push(Entity::new_no_attrs(id.clone(), HashSet::new()));
            id
        }
        Resource::Account(a) => {
            let e = account_entity(n, a)?;
            let id = e.uid();
            entities.push(e);
            id
        }
        Resource::Session(s, a) => {
            let account = account_entity(n, a)?;
            let id = EntityUid::from_type_name_and_id(n.session.clone(), EntityId::new(&s.id));
            let attrs = HashMap::from([
                (
                    "account".to_string(),
                    RestrictedExpression::new_entity_uid(account.uid()),
                ),
                (
                    "delegate".to_string(),
                    RestrictedExpression::new_entity_uid(n.client(&s.delegate)),
                ),
                ("scopes".to_string(), strings(&s.scopes)),
                ("expires_at".to_string(), long(s.expires_at)),
            ]);
            entities.push(account);
            entities
                .push(Entity::new(id.clone(), attrs, HashSet::new()).map_err(|e| PolicyError::Request(e.to_string()))?);
            id
        }
    };
    // A principal that is also the account's creator or delegate is one entity.
    let mut seen = HashSet::new();
    entities.retain(|e| seen.insert(e.uid()));
    let ctx = context(&req.context)?;
    // The context is built here to the schema's shape: debug builds (every
    // test) check each request against the schema, release builds skip it.
    let schema = cfg!(debug_assertions).then_some(&p.schema);
    let request =
        Request::new(principal, action, resource, ctx, schema).map_err(|e| PolicyError::Request(e.to_string()))?;
    let entities = Entities::from_entities(entities, None).map_err(|e| PolicyError::Request(e.to_string()))?;
    Ok((request, entities))
}

/// Decides one request against a set: deny by default, a forbid overrides
/// every permit, the decision names the policies that matched. A request the
/// daemon cannot put to Cedar (a bug) is denied.
pub fn decide(req: &PolicyRequest<'_>, p: &Policies) -> Decision {
    let action = req.action.name();
    let (request, entities) = match build(req, p) {
        Ok(x) => x,
        Err(e) => {
            tracing::error!(action, error = %e, "policy request could not be built: denied");
            return Decision {
                action,
                allowed: false,
                policy_ids: Vec::new(),
                limit: None,
            };
        }
    };
    let set = p.by_action.get(action).unwrap_or(&p.set);
    let response = p.authorizer.is_authorized(&request, set, &entities);
    for e in response.diagnostics().errors() {
        tracing::warn!(action, error = %e, "a policy failed to evaluate and was skipped");
    }
    let mut policy_ids: Vec<String> = response.diagnostics().reason().map(|id| id.to_string()).collect();
    policy_ids.sort();
    Decision {
        action,
        allowed: response.decision() == cedar_policy::Decision::Allow,
        policy_ids,
        limit: None,
    }
}
