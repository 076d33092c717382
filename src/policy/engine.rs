//! The loaded policy set (schema, policies, client mapping), validated as a
//! whole, and the pure decision function over it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::str::FromStr as _;
use std::sync::{Mutex, OnceLock};

use cedar_policy::{
    ActionConstraint, Authorizer, Entities, Entity, EntityId, EntityTypeName, EntityUid, PolicyId, PolicySet,
    PrincipalConstraint, Request, ResourceConstraint, RestrictedExpression, Schema, ValidationMode, Validator,
};
use serde::Deserialize;

use super::context::{
    account_field, context, context_field, context_top, long, string, strings, to_long, Field, Reads, RECORDS, TOP,
};
use super::index::{Attr, Scalar, Slice};
use super::kept::{self, KeptDecisions};
use super::limits::{Limits, LIMITS_FILE};
use super::request::{PolicyRequest, Resource};
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
    /// Per client listed in the clients file, per action: what every such
    /// request shares, prepared once per set (see [`Prepared`]).
    prepared: HashMap<String, HashMap<&'static str, Prepared>>,
    /// The same for a client the clients file does not list.
    unlisted: HashMap<&'static str, Prepared>,
    /// Per action, the context records its policies read.
    reads: HashMap<&'static str, Reads>,
    reasons: BTreeMap<String, String>,
    names: Names,
    authorizer: Authorizer,
    limits: Limits,
    /// Account entities built for requests, by account id (see [`AccountEntities`]).
    accounts: AccountEntities,
    /// Decisions kept by everything Cedar sees of their request (see [`super::kept`]).
    decisions: KeptDecisions,
}

/// Account entities kept between requests: building one (its attributes
/// evaluated by Cedar) costs more than cloning it, and an account signs
/// again and again. An entry is used only while the record still has what
/// the entity was built from; a full map is emptied.
#[derive(Debug, Default)]
struct AccountEntities(Mutex<HashMap<String, (AccountAttrs, Entity)>>);

/// Accounts whose entities are kept.
const ACCOUNT_ENTITIES: usize = 4096;

/// What an account entity is built from, besides the id.
#[derive(Debug, PartialEq, Eq)]
struct AccountAttrs {
    label: Option<String>,
    controller: String,
    created_by: String,
    allowed: Vec<String>,
}

impl AccountAttrs {
    fn of(a: &crate::store::AccountRecord) -> AccountAttrs {
        AccountAttrs {
            label: a.label.clone(),
            controller: a.controller.clone(),
            created_by: a.created_by.clone(),
            allowed: a.allowed.clone(),
        }
    }

    fn matches(&self, a: &crate::store::AccountRecord) -> bool {
        self.label == a.label
            && self.controller == a.controller
            && self.created_by == a.created_by
            && self.allowed == a.allowed
    }
}

impl AccountEntities {
    /// The entity of `a`: kept, or built and kept. An account without keys
    /// (one asked for that does not exist, or a deleted one) is built each
    /// time: ids a client makes up never take the place of real accounts.
    fn get(&self, n: &Names, a: &crate::store::AccountRecord) -> Result<Entity, PolicyError> {
        if a.keys.is_empty() {
            return account_entity(n, a);
        }
        let lock = || self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((attrs, entity)) = lock().get(&a.id) {
            if attrs.matches(a) {
                return Ok(entity.clone());
            }
        }
        let entity = account_entity(n, a)?;
        let mut map = lock();
        if map.len() >= ACCOUNT_ENTITIES && !map.contains_key(&a.id) {
            map.clear();
        }
        map.insert(a.id.clone(), (AccountAttrs::of(a), entity.clone()));
        Ok(entity)
    }
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

    fn service_uid(&self) -> EntityUid {
        EntityUid::from_type_name_and_id(self.service.clone(), EntityId::new("keyward"))
    }

    /// The entity type of a resource kind.
    fn resource_type(&self, r: &Resource<'_>) -> &EntityTypeName {
        match r {
            Resource::Service => &self.service,
            Resource::Account(_) => &self.account,
            Resource::Session(..) => &self.session,
        }
    }
}

/// Who the principal of a prepared request is, for slicing the policy set.
#[derive(Debug)]
enum Principal {
    /// A client of the clients file: its uid and roles (its only ancestors).
    Listed(EntityUid, Vec<EntityUid>),
    /// Any other client: no roles, uid known only per request.
    Unlisted,
}

/// What every request of one client and one action shares, prepared once
/// per set so a decision does not rebuild it: the action entity (with its
/// groups), the client entity and its roles, the service entity, with
/// their transitive closure computed; and per resource kind, the policies
/// that can match (the slice of the action's policies whose principal and
/// resource scopes admit this client and kind), computed on first use.
#[derive(Debug)]
struct Prepared {
    entities: Entities,
    principal: Principal,
    /// Service, Account, Session.
    sets: [OnceLock<Slice>; 3],
}

fn kind_index(r: &Resource<'_>) -> usize {
    match r {
        Resource::Service => 0,
        Resource::Account(_) => 1,
        Resource::Session(..) => 2,
    }
}

impl Prepared {
    /// Whether a policy's principal scope can hold for this client. A
    /// client's ancestors are exactly its roles (roles have no parents in
    /// the entities the engine builds); an unlisted client has none.
    fn principal_may_match(&self, c: &PrincipalConstraint, client_type: &EntityTypeName) -> bool {
        let is_client = |u: &EntityUid| u.type_name() == client_type;
        match (c, &self.principal) {
            (PrincipalConstraint::Any, _) => true,
            (PrincipalConstraint::Is(t), _) => t == client_type,
            (PrincipalConstraint::Eq(u), Principal::Listed(me, _)) => u == me,
            (PrincipalConstraint::In(u), Principal::Listed(me, roles))
            | (PrincipalConstraint::IsIn(_, u), Principal::Listed(me, roles)) => {
                let type_ok = match c {
                    PrincipalConstraint::IsIn(t, _) => t == client_type,
                    _ => true,
                };
                type_ok && (u == me || roles.contains(u))
            }
            (PrincipalConstraint::Eq(u), Principal::Unlisted) | (PrincipalConstraint::In(u), Principal::Unlisted) => {
                is_client(u)
            }
            (PrincipalConstraint::IsIn(t, u), Principal::Unlisted) => t == client_type && is_client(u),
        }
    }

    /// The policies of `subset` that can match this client on a resource
    /// of `kind`, indexed by the attribute literals they compare with.
    /// Accounts, sessions and the service have no ancestors, so
    /// `resource in E` holds only for `E` itself.
    fn slice(&self, subset: &PolicySet, n: &Names, kind: &EntityTypeName) -> Slice {
        let resource_ok = |c: &ResourceConstraint| match c {
            ResourceConstraint::Any => true,
            ResourceConstraint::Is(t) => t == kind,
            ResourceConstraint::Eq(u) | ResourceConstraint::In(u) => u.type_name() == kind,
            ResourceConstraint::IsIn(t, u) => t == kind && u.type_name() == kind,
        };
        let kept = subset.policies().filter(|p| {
            self.principal_may_match(&p.principal_constraint(), &n.client) && resource_ok(&p.resource_constraint())
        });
        // A subset of a valid set cannot hold duplicate ids; if it somehow
        // did, the whole subset, unindexed, is the sound answer.
        Slice::build(kept, |path| readable(n, kind, path)).unwrap_or_else(|| Slice {
            general: subset.clone(),
            indexed: Vec::new(),
        })
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
        let mut undeclared = Vec::new();
        for a in Action::ALL {
            let id = uid("Keyward::Action", a.name())?;
            // An action this version added, in a schema written for an earlier one: no policy
            // can name it, so every such request is denied (deny by default) until the schema
            // declares it and a policy permits it. Said once, at load.
            let Some(entity) = action_entities.get(&id).cloned() else {
                undeclared.push(a.name());
                continue;
            };
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
        if !undeclared.is_empty() {
            tracing::warn!(
                schema = %schema_path.display(),
                actions = ?undeclared,
                "the policy schema does not declare these actions (added by a newer keyward): \
                 they are denied to everyone until the schema declares them and a policy permits them"
            );
        }
        let names = Names::new()?;
        let mut reads = HashMap::new();
        for (action, subset) in &by_action {
            reads.insert(
                *action,
                Reads::of(subset.policies()).map_err(|e| invalid(schema_path, e))?,
            );
        }
        let prepare = |client: Option<(&str, &ClientInfo)>| -> Result<HashMap<&'static str, Prepared>, PolicyError> {
            let mut out = HashMap::new();
            for (action, entity) in &actions {
                // Roles and the service carry no attributes and roles have
                // no parents: a client's roles are its ancestors, so neither
                // needs to be in the store for `in`, `==` or `is` to hold.
                let mut shared = vec![entity.clone()];
                let principal = match client {
                    Some((identity, info)) => {
                        shared.push(client_entity(&names, identity, info)?);
                        Principal::Listed(names.client(identity), info.roles.clone())
                    }
                    None => Principal::Unlisted,
                };
                let entities =
                    Entities::from_entities(shared, None).map_err(|e| invalid(schema_path, e.to_string()))?;
                out.insert(
                    *action,
                    Prepared {
                        entities,
                        principal,
                        sets: Default::default(),
                    },
                );
            }
            Ok(out)
        };
        let mut prepared = HashMap::new();
        for (identity, info) in &clients {
            prepared.insert(identity.clone(), prepare(Some((identity, info)))?);
        }
        let unlisted = prepare(None)?;
        Ok(Policies {
            schema: parsed_schema,
            set,
            by_action,
            clients,
            actions,
            prepared,
            unlisted,
            reads,
            reasons,
            names,
            authorizer: Authorizer::new(),
            limits,
            accounts: AccountEntities::default(),
            decisions: KeptDecisions::default(),
        })
    }

    /// Keeps up to `decisions` decisions from now on (see `kept.rs`).
    pub fn keep_decisions(&self, decisions: usize) {
        self.decisions.set_capacity(decisions);
    }

    /// How many decisions the set keeps at most.
    pub fn kept_capacity(&self) -> usize {
        self.decisions.capacity()
    }

    /// Whether the schema declares `action` (one it does not is denied to everyone).
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

/// The value of an indexed attribute for a request, exactly as the
/// entities and context built for Cedar carry it; `None`: not readable.
fn scalar_of(req: &PolicyRequest<'_>, p: &Policies, path: &Attr) -> Option<Scalar> {
    match path {
        Attr::Context(record, name) => context_field(&req.context, record, name)?.scalar(),
        Attr::ContextTop(name) => context_top(&req.context, name)?.scalar(),
        Attr::Resource(name) => match req.resource {
            Resource::Account(a) => account_field(a, name)?.scalar(),
            Resource::Session(s, _) if name == "expires_at" => Some(Scalar::Long(to_long(s.expires_at))),
            _ => None,
        },
        Attr::Principal(name) => match name.as_str() {
            "identity" => Some(Scalar::Str(req.principal.to_string())),
            "team" => Some(Scalar::Str(
                p.clients.get(req.principal).map(|c| c.team.clone()).unwrap_or_default(),
            )),
            _ => None,
        },
    }
}

/// Whether [`scalar_of`] reads `path` for every request on a resource of `kind`.
fn readable(n: &Names, kind: &EntityTypeName, path: &Attr) -> bool {
    match path {
        Attr::Context(record, name) => RECORDS.iter().any(|(r, fs)| r == record && fs.contains(&name.as_str())),
        Attr::ContextTop(name) => TOP.contains(&name.as_str()),
        Attr::Resource(name) => {
            (kind == &n.account && matches!(name.as_str(), "label" | "controller"))
                || (kind == &n.session && name == "expires_at")
        }
        Attr::Principal(name) => matches!(name.as_str(), "identity" | "team"),
    }
}

fn client_entity(n: &Names, identity: &str, info: &ClientInfo) -> Result<Entity, PolicyError> {
    Entity::new(
        n.client(identity),
        HashMap::from([
            ("identity".to_string(), string(identity)),
            ("team".to_string(), string(&info.team)),
        ]),
        info.roles.iter().cloned().collect(),
    )
    .map_err(|e| PolicyError::Request(e.to_string()))
}

fn field_expr(f: Option<Field<'_>>) -> RestrictedExpression {
    f.map(Field::expr).unwrap_or_else(|| string(""))
}

fn account_entity(n: &Names, a: &crate::store::AccountRecord) -> Result<Entity, PolicyError> {
    let allowed = a
        .allowed
        .iter()
        .map(|x| RestrictedExpression::new_entity_uid(n.client(x)))
        .collect::<Vec<_>>();
    let attrs = HashMap::from([
        ("label".to_string(), field_expr(account_field(a, "label"))),
        ("controller".to_string(), field_expr(account_field(a, "controller"))),
        (
            "created_by".to_string(),
            RestrictedExpression::new_entity_uid(n.client(&a.created_by)),
        ),
        ("allowed".to_string(), RestrictedExpression::new_set(allowed)),
    ]);
    let id = EntityUid::from_type_name_and_id(n.account.clone(), EntityId::new(&a.id));
    Entity::new(id, attrs, HashSet::new()).map_err(|e| PolicyError::Request(e.to_string()))
}

/// The request's resource: its uid, with its entities (account; session
/// and its account) pushed to `out`. The service needs none.
fn resource_entities(
    n: &Names,
    accounts: Option<&AccountEntities>,
    resource: &Resource<'_>,
    out: &mut Vec<Entity>,
) -> Result<EntityUid, PolicyError> {
    let account = |a| match accounts {
        Some(kept) => kept.get(n, a),
        None => account_entity(n, a),
    };
    Ok(match resource {
        Resource::Service => n.service_uid(),
        Resource::Account(a) => {
            let e = account(a)?;
            let id = e.uid();
            out.push(e);
            id
        }
        Resource::Session(s, a) => {
            let account = account(a)?;
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
            out.push(account);
            out.push(Entity::new(id.clone(), attrs, HashSet::new()).map_err(|e| PolicyError::Request(e.to_string()))?);
            id
        }
    })
}

/// The Cedar request, its entities and the slice of policies that can match it.
fn build<'p>(req: &PolicyRequest<'_>, p: &'p Policies) -> Result<(Request, Entities, &'p Slice), PolicyError> {
    let name = req.action.name();
    let missing = || PolicyError::Request(format!("no action entity for {name}"));
    let action = p.actions.get(name).ok_or_else(missing)?.uid();
    let subset = p.by_action.get(name).ok_or_else(missing)?;
    let listed = p.prepared.get(req.principal);
    let prepared = listed.unwrap_or(&p.unlisted).get(name).ok_or_else(missing)?;
    let n = &p.names;
    let principal = n.client(req.principal);
    // Per request only what differs: the resource (and an unlisted client).
    let mut extra = Vec::with_capacity(3);
    if listed.is_none() {
        extra.push(client_entity(n, req.principal, &ClientInfo::default())?);
    }
    let resource = resource_entities(n, Some(&p.accounts), &req.resource, &mut extra)?;
    let entities = prepared
        .entities
        .clone()
        .add_entities(extra, None)
        .map_err(|e| PolicyError::Request(e.to_string()))?;
    let set = prepared.sets[kind_index(&req.resource)]
        .get_or_init(|| prepared.slice(subset, n, n.resource_type(&req.resource)));
    // Debug builds (every test) check the full context against the schema;
    // the request itself carries only the records the action's policies read.
    if cfg!(debug_assertions) {
        let full = context(&req.context, &Reads::EVERYTHING)?;
        Request::new(
            principal.clone(),
            action.clone(),
            resource.clone(),
            full,
            Some(&p.schema),
        )
        .map_err(|e| PolicyError::Request(e.to_string()))?;
    }
    let reads = p.reads.get(name).ok_or_else(missing)?;
    let ctx = context(&req.context, reads)?;
    let request =
        Request::new(principal, action, resource, ctx, None).map_err(|e| PolicyError::Request(e.to_string()))?;
    Ok((request, entities, set))
}

/// Decides one request against a set: deny by default, a forbid overrides
/// every permit, the decision names the policies that matched. A request the
/// daemon cannot put to Cedar (a bug) is denied.
pub fn decide(req: &PolicyRequest<'_>, p: &Policies) -> Decision {
    let action = req.action.name();
    if !p.declares(req.action) {
        // Not in this set's schema (see `load`): deny by default, naming nothing.
        return Decision {
            action,
            allowed: false,
            policy_ids: Vec::new(),
            limit: None,
        };
    }
    // The same inputs give the same decision: keep it (see `kept`).
    let key = p.reads.get(action).and_then(|reads| kept::key(req, reads));
    if let Some(d) = key.as_deref().and_then(|k| p.decisions.get(k)) {
        return d;
    }
    let (request, entities, slice) = match build(req, p) {
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
    // The slice's general policies, and of each indexed attribute the
    // group whose literal is the request's value. Cedar decides each set;
    // together: a matching forbid denies, else a matching permit allows,
    // else deny — Cedar's own rule over the union.
    let mut sets = vec![&slice.general];
    for (path, buckets) in &slice.indexed {
        match scalar_of(req, p, path) {
            Some(value) => sets.extend(buckets.get(&value)),
            // Not readable here after all: every group is evaluated.
            None => sets.extend(buckets.values()),
        }
    }
    let (mut permits, mut forbids) = (Vec::new(), Vec::new());
    let mut failed = false;
    for set in sets {
        let response = p.authorizer.is_authorized(&request, set, &entities);
        for e in response.diagnostics().errors() {
            failed = true;
            tracing::warn!(action, error = %e, "a policy failed to evaluate and was skipped");
        }
        let ids = response.diagnostics().reason().map(|id| id.to_string());
        match response.decision() {
            cedar_policy::Decision::Allow => permits.extend(ids),
            cedar_policy::Decision::Deny => forbids.extend(ids),
        }
    }
    let allowed = forbids.is_empty() && !permits.is_empty();
    let mut policy_ids = if allowed { permits } else { forbids };
    policy_ids.sort();
    let decision = Decision {
        action,
        allowed,
        policy_ids,
        limit: None,
    };
    if let (Some(key), false) = (key, failed) {
        p.decisions.insert(key, &decision);
    }
    decision
}

/// The decision without anything prepared: every entity and the whole
/// context built for the request, the whole set evaluated. Tests hold
/// [`decide`] to it. `None`: the request does not fit the schema (a
/// resource type the action does not take).
#[cfg(test)]
pub(crate) fn decide_unprepared(req: &PolicyRequest<'_>, p: &Policies) -> Option<Decision> {
    let build = || -> Result<(Request, Entities), PolicyError> {
        let n = &p.names;
        let action = p
            .actions
            .get(req.action.name())
            .ok_or_else(|| PolicyError::Request("no action".into()))?;
        let info = p.clients.get(req.principal).cloned().unwrap_or_default();
        let mut entities = vec![action.clone(), Entity::new_no_attrs(n.service_uid(), HashSet::new())];
        for r in &info.roles {
            entities.push(Entity::new_no_attrs(r.clone(), HashSet::new()));
        }
        entities.push(client_entity(n, req.principal, &info)?);
        let resource = resource_entities(n, None, &req.resource, &mut entities)?;
        let ctx = context(&req.context, &Reads::EVERYTHING)?;
        let request = Request::new(n.client(req.principal), action.uid(), resource, ctx, Some(&p.schema))
            .map_err(|e| PolicyError::Request(e.to_string()))?;
        let entities = Entities::from_entities(entities, None).map_err(|e| PolicyError::Request(e.to_string()))?;
        Ok((request, entities))
    };
    let (request, entities) = build().ok()?;
    let response = p.authorizer.is_authorized(&request, &p.set, &entities);
    let mut policy_ids: Vec<String> = response.diagnostics().reason().map(|id| id.to_string()).collect();
    policy_ids.sort();
    Some(Decision {
        action: req.action.name(),
        allowed: response.decision() == cedar_policy::Decision::Allow,
        policy_ids,
        limit: None,
    })
}

/// The set's kept decisions.
#[cfg(test)]
pub(crate) fn kept_decisions(p: &Policies) -> &KeptDecisions {
    &p.decisions
}

/// How many account entities the set keeps.
#[cfg(test)]
pub(crate) fn kept_accounts(p: &Policies) -> usize {
    p.accounts.0.lock().map(|m| m.len()).unwrap_or(0)
}

/// How many indexed attributes the slices built so far hold.
#[cfg(test)]
pub(crate) fn indexed_attributes(p: &Policies) -> usize {
    p.prepared
        .values()
        .flat_map(HashMap::values)
        .chain(p.unlisted.values())
        .flat_map(|prepared| prepared.sets.iter().filter_map(OnceLock::get))
        .map(|slice| slice.indexed.len())
        .sum()
}
