//! The policy folder: gateway settings, named stores, the client registry and policies, read
//! from every `*.yaml` / `*.yml` file of one folder and checked as one set.
//!
//! Loading never stops at the first mistake: every error of every file is collected, each with
//! file, line, column and a YAML path, so `gateway check` can print them all at once.

pub mod yaml;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use filters::{KINDS, Kind};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_yaml::{Mapping, Value};
use store::StoreConfig;

use yaml::{Document, index, key};

/// One configuration mistake, located.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// YAML path inside the file (`policies[0].chain[1].access_token.store`); empty for the
    /// file as a whole.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// Every error of a policy set.
#[derive(Debug)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Server limits (`limits:`), with defaults an edge proxy can run with.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Time allowed for a client to send the request head (slowloris guard), counted from
    /// when the connection starts waiting for one; the cut comes within about a quarter more.
    pub header_read_timeout_secs: u64,
    /// Request line and headers together; beyond it: 431.
    pub max_header_bytes: usize,
    /// Header count; beyond it: 431.
    pub max_headers: usize,
    /// Request body; beyond it: 413.
    pub max_body_bytes: usize,
    /// Open client connections; new ones wait in the accept queue beyond it.
    pub max_connections: usize,
    pub keep_alive: bool,
    /// Time allowed to read the body and run the chain; beyond it: 408 or 504.
    pub request_timeout_secs: u64,
    /// On SIGTERM/SIGINT, time given to in-flight requests before the process exits.
    pub drain_timeout_secs: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout_secs: 10,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            max_body_bytes: 64 * 1024,
            max_connections: 10_000,
            keep_alive: true,
            request_timeout_secs: 30,
            drain_timeout_secs: 10,
        }
    }
}

/// Where the client application registry lives (`applications:`).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ApplicationsConfig {
    /// A YAML file, relative to the policy folder.
    File { path: PathBuf },
    /// The `client_applications` table of a named SQL store.
    Sql { store: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub limits: Limits,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            listen: "127.0.0.1:8080".parse().expect("literal address"),
            admin: "127.0.0.1:9901".parse().expect("literal address"),
            limits: Limits::default(),
        }
    }
}

/// How a policy is matched to a request.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Exact path.
    #[serde(default)]
    pub path: Option<String>,
    /// Path prefix (the longest matching prefix wins; an exact path beats any prefix).
    #[serde(default)]
    pub prefix: Option<String>,
    /// Allowed methods; empty means any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Host (without port); absent means any host.
    #[serde(default)]
    pub host: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
}

#[derive(Clone, Debug)]
pub struct Route {
    pub path: PathMatch,
    pub methods: Vec<http::Method>,
    pub host: Option<String>,
}

/// Where a piece of configuration came from, to locate errors found after loading.
#[derive(Clone, Debug)]
pub struct Origin {
    pub doc: usize,
    pub path: String,
}

pub struct NodeDef {
    pub name: String,
    pub kind: &'static Kind,
    /// The node's own settings, with `name`, `type`, `on_success`, `on_failure` removed.
    pub settings: Value,
    /// Index of the next node on success; `None` ends the chain.
    pub on_success: Option<usize>,
    /// Index of the node on failure; `None` sends the filter's own failure response.
    pub on_failure: Option<usize>,
    /// The service context this node belongs to (`service:` on the node), beside the
    /// policy's own.
    pub service: Option<String>,
    pub origin: Origin,
}

pub struct PolicyDef {
    pub name: String,
    /// The monitoring service context (defaults to the policy name).
    pub service: String,
    pub monitoring: PolicyMonitoring,
    pub route: Route,
    pub nodes: Vec<NodeDef>,
    pub origin: Origin,
}

/// A loaded and checked policy folder, ready to be built into a running engine.
pub struct PolicySet {
    pub dir: PathBuf,
    pub settings: Settings,
    pub stores: BTreeMap<String, StoreConfig>,
    pub store_origins: HashMap<String, Origin>,
    pub applications: Option<(ApplicationsConfig, Origin)>,
    pub policies: Vec<PolicyDef>,
    pub docs: Vec<Document>,
    /// Accepted, but worth telling the operator.
    pub warnings: Vec<ConfigError>,
}

impl PolicySet {
    pub fn error_at(&self, origin: &Origin, sub: &str, message: impl Into<String>) -> ConfigError {
        let path = if sub.is_empty() {
            origin.path.clone()
        } else if sub.starts_with('[') {
            format!("{}{sub}", origin.path)
        } else {
            key(&origin.path, sub)
        };
        self.docs[origin.doc].error(&path, message)
    }
}

const TOP_LEVEL: &[&str] = &[
    "listen",
    "admin",
    "limits",
    "stores",
    "applications",
    "policies",
];
const NODE_KEYS: &[&str] = &["name", "type", "on_success", "on_failure", "service"];

/// Reads and checks every YAML file of `dir`.
pub fn load_dir(dir: &Path) -> Result<PolicySet, ConfigErrors> {
    let (set, errors) = load_dir_partial(dir, &[]);
    if errors.is_empty() {
        Ok(set)
    } else {
        Err(ConfigErrors(errors))
    }
}

/// Like [`load_dir`], but also returns what could be loaded despite errors, so that the
/// builders can report their own errors in the same run (`gateway check` lists everything).
/// `extra` adds filter kinds beside the built-in ones (for programs that embed the engine).
pub fn load_dir_partial(dir: &Path, extra: &'static [Kind]) -> (PolicySet, Vec<ConfigError>) {
    let mut errors = Vec::new();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.is_file()
                    && matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml"))
            })
            .collect(),
        Err(e) => {
            errors.push(ConfigError {
                file: dir.to_owned(),
                line: 0,
                column: 0,
                path: String::new(),
                message: format!("cannot read the policy folder: {e}"),
            });
            Vec::new()
        }
    };
    files.sort();
    let mut docs = Vec::new();
    for f in &files {
        match std::fs::read_to_string(f) {
            Ok(src) => match yaml::parse(f, &src) {
                Ok(mut doc) => {
                    expand_env(&mut doc, &mut errors);
                    docs.push(doc);
                }
                Err(e) => errors.push(e),
            },
            Err(e) => errors.push(ConfigError {
                file: f.clone(),
                line: 0,
                column: 0,
                path: String::new(),
                message: format!("cannot read: {e}"),
            }),
        }
    }
    if files.is_empty() {
        errors.push(ConfigError {
            file: dir.to_owned(),
            line: 0,
            column: 0,
            path: String::new(),
            message: "no *.yaml or *.yml file in the policy folder".into(),
        });
    }
    let mut set = PolicySet {
        dir: dir.to_owned(),
        settings: Settings::default(),
        stores: BTreeMap::new(),
        store_origins: HashMap::new(),
        applications: None,
        policies: Vec::new(),
        docs: Vec::new(),
        warnings: Vec::new(),
    };
    let mut seen_setting: HashMap<&'static str, String> = HashMap::new();
    for di in 0..docs.len() {
        read_document(di, &docs, extra, &mut set, &mut seen_setting, &mut errors);
    }
    set.docs = docs;
    check_policies(&set, &mut errors);
    (set, errors)
}

/// Orders errors by file and position, so that they read like a compiler's.
pub fn sort_errors(errors: &mut [ConfigError]) {
    errors.sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
}

fn describe(doc: &Document, path: &str) -> String {
    let (l, c) = doc.positions.find(path);
    format!("{}:{l}:{c}", doc.file.display())
}

fn read_document(
    di: usize,
    docs: &[Document],
    extra: &'static [Kind],
    set: &mut PolicySet,
    seen: &mut HashMap<&'static str, String>,
    errors: &mut Vec<ConfigError>,
) {
    let doc = &docs[di];
    let map = match &doc.value {
        Value::Mapping(m) => m,
        Value::Null => return, // an empty file
        _ => {
            errors.push(doc.error("", "expected a mapping at the top of the file"));
            return;
        }
    };
    for (k, v) in map {
        let Some(name) = k.as_str() else {
            errors.push(doc.error("", "top-level keys must be strings"));
            continue;
        };
        let Some(&known) = TOP_LEVEL.iter().find(|t| **t == name) else {
            errors.push(doc.error(
                name,
                format!(
                    "unknown key `{name}`, expected one of: {}",
                    TOP_LEVEL.join(", ")
                ),
            ));
            continue;
        };
        if known != "stores" && known != "policies" {
            if let Some(first) = seen.get(known) {
                errors.push(doc.error(name, format!("`{name}` is already set at {first}")));
                continue;
            }
            seen.insert(known, describe(doc, name));
        }
        match known {
            "listen" => {
                if let Some(a) = typed::<SocketAddr>(doc, name, v, errors) {
                    set.settings.listen = a;
                }
            }
            "admin" => {
                if let Some(a) = typed::<SocketAddr>(doc, name, v, errors) {
                    set.settings.admin = a;
                }
            }
            "limits" => {
                if let Some(l) = typed::<Limits>(doc, name, v, errors) {
                    set.settings.limits = l;
                }
            }
            "applications" => {
                if let Some(a) = typed::<ApplicationsConfig>(doc, name, v, errors) {
                    set.applications = Some((
                        a,
                        Origin {
                            doc: di,
                            path: name.into(),
                        },
                    ));
                }
            }
            "stores" => read_stores(di, docs, v, set, errors),
            "policies" => read_policies(di, doc, extra, v, set, errors),
            _ => unreachable!("every top-level key is handled"),
        }
    }
}

fn read_stores(
    di: usize,
    docs: &[Document],
    v: &Value,
    set: &mut PolicySet,
    errors: &mut Vec<ConfigError>,
) {
    let doc = &docs[di];
    let Value::Mapping(m) = v else {
        errors.push(doc.error(
            "stores",
            "expected a mapping of store names to store settings",
        ));
        return;
    };
    for (k, sv) in m {
        let Some(name) = k.as_str() else {
            errors.push(doc.error("stores", "store names must be strings"));
            continue;
        };
        let path = key("stores", name);
        if let Some(o) = set.store_origins.get(name) {
            let first = describe(&docs[o.doc], &o.path);
            errors.push(doc.error(
                &path,
                format!("duplicate store name {name:?} (first defined at {first})"),
            ));
            continue;
        }
        if let Some(c) = typed::<StoreConfig>(doc, &path, sv, errors) {
            set.stores.insert(name.to_owned(), c);
            set.store_origins
                .insert(name.to_owned(), Origin { doc: di, path });
        }
    }
}

/// A policy's monitoring settings (`monitoring:` on the policy).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyMonitoring {
    /// Record the policy's service context (and its nodes) at all.
    pub enabled: bool,
    /// The attribute whose value labels the client of the policy's service contexts.
    pub client_attribute: String,
    /// A composite context around the service contexts of this policy's nodes: exported as
    /// its own series, it passes only if every one of them passed.
    pub composite: Option<String>,
}

impl Default for PolicyMonitoring {
    fn default() -> Self {
        PolicyMonitoring {
            enabled: true,
            client_attribute: "authentication.subject.id".into(),
            composite: None,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicyHeader {
    name: String,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    monitoring: PolicyMonitoring,
    route: RouteConfig,
    chain: Vec<Value>,
}

fn read_policies(
    di: usize,
    doc: &Document,
    extra: &'static [Kind],
    v: &Value,
    set: &mut PolicySet,
    errors: &mut Vec<ConfigError>,
) {
    let Value::Sequence(items) = v else {
        errors.push(doc.error("policies", "expected a list of policies"));
        return;
    };
    for (pi, item) in items.iter().enumerate() {
        let ppath = index("policies", pi);
        let Some(h) = typed::<PolicyHeader>(doc, &ppath, item, errors) else {
            continue;
        };
        let route = match read_route(&h.route) {
            Ok(r) => r,
            Err((sub, m)) => {
                errors.push(doc.error(&key(&key(&ppath, "route"), sub), m));
                continue;
            }
        };
        if h.chain.is_empty() {
            errors.push(doc.error(&key(&ppath, "chain"), "a chain needs at least one node"));
            continue;
        }
        let cpath = key(&ppath, "chain");
        // First pass: names, so that edges can point forward.
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut ok = true;
        for (ni, n) in h.chain.iter().enumerate() {
            let npath = index(&cpath, ni);
            match n.get("name").and_then(Value::as_str) {
                Some(name) if !name.trim().is_empty() => {
                    if let Some(first) = names.get(name) {
                        errors.push(doc.error(
                            &key(&npath, "name"),
                            format!(
                                "duplicate node name {name:?} in policy {:?} (first at {})",
                                h.name,
                                describe(doc, &key(&index(&cpath, *first), "name"))
                            ),
                        ));
                        ok = false;
                    } else {
                        names.insert(name.to_owned(), ni);
                    }
                }
                _ => {
                    errors.push(doc.error(&npath, "every node needs a `name`"));
                    ok = false;
                }
            }
        }
        let mut nodes = Vec::new();
        for (ni, n) in h.chain.iter().enumerate() {
            let npath = index(&cpath, ni);
            let Value::Mapping(m) = n else {
                errors.push(doc.error(&npath, "a node is a mapping with `name` and `type`"));
                ok = false;
                continue;
            };
            let name = n
                .get("name")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            let kind = match m.get("type") {
                Some(Value::String(t)) => match KINDS.iter().chain(extra).find(|k| k.name == t) {
                    Some(k) => Some(k),
                    None => {
                        let known: Vec<&str> = KINDS.iter().chain(extra).map(|k| k.name).collect();
                        errors.push(doc.error(
                            &key(&npath, "type"),
                            format!(
                                "unknown filter type {t:?}, expected one of: {}",
                                known.join(", ")
                            ),
                        ));
                        None
                    }
                },
                Some(_) => {
                    errors.push(doc.error(&key(&npath, "type"), "`type` must be a string"));
                    None
                }
                None => {
                    // A misspelt `type` (`typ`, `tpye`, `Type`) is named where it stands: the
                    // filter it meant is unknown, so no check of the filter's keys would name it.
                    let misspelt = m.keys().filter_map(Value::as_str).find(|k| {
                        !NODE_KEYS.contains(k)
                            && strsim::damerau_levenshtein(&k.to_ascii_lowercase(), "type") <= 2
                    });
                    errors.push(match misspelt {
                        Some(k) => doc.error(
                            &key(&npath, k),
                            format!("every node needs a `type`; is `{k}` a misspelt `type`?"),
                        ),
                        None => doc.error(&npath, "every node needs a `type`"),
                    });
                    None
                }
            };
            let mut edge = |field: &str, default: Option<usize>| -> Option<usize> {
                match m.get(field) {
                    None => default,
                    Some(Value::String(target)) => match names.get(target.as_str()) {
                        Some(&t) => Some(t),
                        None => {
                            let mut known: Vec<&str> = names.keys().map(String::as_str).collect();
                            known.sort_unstable();
                            errors.push(doc.error(
                                &key(&npath, field),
                                format!(
                                    "no node named {target:?} in policy {:?} (nodes: {})",
                                    h.name,
                                    known.join(", ")
                                ),
                            ));
                            ok = false;
                            None
                        }
                    },
                    Some(_) => {
                        errors.push(doc.error(&key(&npath, field), "expected the name of a node"));
                        ok = false;
                        None
                    }
                }
            };
            let next = (ni + 1 < h.chain.len()).then_some(ni + 1);
            let on_success = edge("on_success", next);
            let on_failure = edge("on_failure", None);
            let service = match m.get("service") {
                None => None,
                Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
                Some(_) => {
                    errors.push(
                        doc.error(&key(&npath, "service"), "expected a service context name"),
                    );
                    ok = false;
                    None
                }
            };
            let mut settings = Mapping::new();
            for (k, v) in m {
                if !k.as_str().is_some_and(|k| NODE_KEYS.contains(&k)) {
                    settings.insert(k.clone(), v.clone());
                }
            }
            if let Some(kind) = kind {
                nodes.push(NodeDef {
                    name,
                    kind,
                    settings: Value::Mapping(settings),
                    on_success,
                    on_failure,
                    service,
                    origin: Origin {
                        doc: di,
                        path: npath,
                    },
                });
            } else {
                ok = false;
            }
        }
        if !ok {
            continue;
        }
        if let Some(cycle) = find_cycle(&nodes) {
            let names: Vec<&str> = cycle.iter().map(|&i| nodes[i].name.as_str()).collect();
            errors.push(doc.error(
                &index(&cpath, cycle[0]),
                format!("the chain loops: {} -> {}", names.join(" -> "), names[0]),
            ));
            continue;
        }
        set.policies.push(PolicyDef {
            service: h.service.unwrap_or_else(|| h.name.clone()),
            monitoring: h.monitoring,
            name: h.name,
            route,
            nodes,
            origin: Origin {
                doc: di,
                path: ppath,
            },
        });
    }
}

fn read_route(r: &RouteConfig) -> Result<Route, (&'static str, String)> {
    let path = match (&r.path, &r.prefix) {
        (Some(p), None) => PathMatch::Exact(p.clone()),
        (None, Some(p)) => PathMatch::Prefix(p.clone()),
        _ => return Err(("", "give exactly one of `path` (exact) or `prefix`".into())),
    };
    let p = match &path {
        PathMatch::Exact(p) | PathMatch::Prefix(p) => p,
    };
    if !p.starts_with('/') {
        return Err((
            if r.path.is_some() { "path" } else { "prefix" },
            format!("{p:?} must start with `/`"),
        ));
    }
    let mut methods = Vec::new();
    for m in &r.methods {
        match http::Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
            Ok(m) => methods.push(m),
            Err(_) => return Err(("methods", format!("{m:?} is not an HTTP method"))),
        }
    }
    Ok(Route {
        path,
        methods,
        host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
    })
}

/// A node cycle in the success/failure graph, if any (in visiting order).
fn find_cycle(nodes: &[NodeDef]) -> Option<Vec<usize>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Active,
        Done,
    }
    fn visit(
        i: usize,
        nodes: &[NodeDef],
        marks: &mut [Mark],
        stack: &mut Vec<usize>,
    ) -> Option<Vec<usize>> {
        marks[i] = Mark::Active;
        stack.push(i);
        for next in [nodes[i].on_success, nodes[i].on_failure]
            .into_iter()
            .flatten()
        {
            match marks[next] {
                Mark::Active => {
                    let start = stack.iter().position(|&s| s == next).unwrap_or(0);
                    return Some(stack[start..].to_vec());
                }
                Mark::New => {
                    if let Some(c) = visit(next, nodes, marks, stack) {
                        return Some(c);
                    }
                }
                Mark::Done => {}
            }
        }
        stack.pop();
        marks[i] = Mark::Done;
        None
    }
    let mut marks = vec![Mark::New; nodes.len()];
    for i in 0..nodes.len() {
        if marks[i] == Mark::New
            && let Some(c) = visit(i, nodes, &mut marks, &mut Vec::new())
        {
            return Some(c);
        }
    }
    None
}

/// Checks across files: duplicate policy names and routes that two policies claim.
fn check_policies(set: &PolicySet, errors: &mut Vec<ConfigError>) {
    let mut names: HashMap<&str, &Origin> = HashMap::new();
    let mut routes: HashMap<(String, Option<String>, Vec<String>), &PolicyDef> = HashMap::new();
    for p in &set.policies {
        if let Some(first) = names.get(p.name.as_str()) {
            let at = set.docs[first.doc].error(&first.path, "");
            errors.push(set.error_at(
                &p.origin,
                "name",
                format!(
                    "duplicate policy name {:?} (first at {}:{}:{})",
                    p.name,
                    at.file.display(),
                    at.line,
                    at.column
                ),
            ));
        } else {
            names.insert(&p.name, &p.origin);
        }
        let path = match &p.route.path {
            PathMatch::Exact(s) => format!("={s}"),
            PathMatch::Prefix(s) => format!("^{s}"),
        };
        let mut methods: Vec<String> = p.route.methods.iter().map(|m| m.to_string()).collect();
        methods.sort();
        let rk = (path, p.route.host.clone(), methods);
        if let Some(first) = routes.get(&rk) {
            errors.push(set.error_at(
                &p.origin,
                "route",
                format!(
                    "policy {:?} has the same route as policy {:?}",
                    p.name, first.name
                ),
            ));
        } else {
            routes.insert(rk, p);
        }
    }
}

/// Deserialises `v` as `T`, recording an error located at the offending key on failure.
fn typed<T: DeserializeOwned>(
    doc: &Document,
    path: &str,
    v: &Value,
    errors: &mut Vec<ConfigError>,
) -> Option<T> {
    // The filters' own settings go through the same `parse` (the offending key's path, and an
    // enum's names where serde_yaml gives none).
    match filters::registry::parse::<T>(v.clone()) {
        Ok(t) => Some(t),
        Err(e) => {
            let msg = yaml::clean_message(&e.message);
            errors.push(doc.error(&join_error_path(path, &e.path, &msg), msg));
            None
        }
    }
}

/// Joins a serde path under `base`, pointing at an unknown key itself rather than at the
/// mapping that holds it.
pub fn join_error_path(base: &str, sub: &str, message: &str) -> String {
    let mut path = base.to_owned();
    if sub != "." && !sub.is_empty() {
        if sub.starts_with('[') {
            path.push_str(sub);
        } else {
            path = key(&path, sub);
        }
    }
    if let Some(rest) = message.strip_prefix("unknown field `")
        && let Some(end) = rest.find('`')
    {
        let field = &rest[..end];
        // serde_path_to_error sometimes already ends the path with the field.
        if !path.ends_with(&format!(".{field}")) && path != field {
            path = key(&path, field);
        }
    }
    path
}

/// Expands `${NAME}` and `${NAME:-default}` in every string value, where NAME is an
/// environment variable name (upper case, digits, `_`). Lower-case or dotted references such
/// as `${authentication.subject.id}` are attribute templates, left for the filters.
fn expand_env(doc: &mut Document, errors: &mut Vec<ConfigError>) {
    fn walk(v: &mut Value, path: &str, doc_errors: &mut Vec<(String, String)>) {
        match v {
            Value::String(s) => match expand_str(s) {
                Ok(Some(new)) => *s = new,
                Ok(None) => {}
                Err(m) => doc_errors.push((path.to_owned(), m)),
            },
            Value::Sequence(items) => {
                for (i, it) in items.iter_mut().enumerate() {
                    walk(it, &index(path, i), doc_errors);
                }
            }
            Value::Mapping(m) => {
                for (k, it) in m.iter_mut() {
                    let p = key(path, k.as_str().unwrap_or("?"));
                    walk(it, &p, doc_errors);
                }
            }
            Value::Tagged(t) => walk(&mut t.value, path, doc_errors),
            _ => {}
        }
    }
    let mut found = Vec::new();
    walk(&mut doc.value, "", &mut found);
    for (p, m) in found {
        errors.push(doc.error(&p, m));
    }
}

fn is_env_name(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_uppercase() || c == '_')
        && chars.all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// `Ok(None)` when nothing was expanded.
pub fn expand_str(s: &str) -> Result<Option<String>, String> {
    if !s.contains("${") {
        return Ok(None);
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let mut changed = false;
    while let Some(i) = rest.find("${") {
        // `$${` is an escape kept for the template layer.
        if i > 0 && rest.as_bytes()[i - 1] == b'$' {
            out.push_str(&rest[..i + 2]);
            rest = &rest[i + 2..];
            continue;
        }
        let Some(end) = rest[i + 2..].find('}') else {
            break;
        };
        let inner = &rest[i + 2..i + 2 + end];
        let (name, default) = match inner.split_once(":-") {
            Some((n, d)) => (n, Some(d)),
            None => (inner, None),
        };
        if !is_env_name(name) {
            out.push_str(&rest[..i + 3 + end]);
            rest = &rest[i + 3 + end..];
            continue;
        }
        out.push_str(&rest[..i]);
        match (std::env::var(name), default) {
            (Ok(v), _) => out.push_str(&v),
            (Err(_), Some(d)) => out.push_str(d),
            (Err(_), None) => {
                return Err(format!(
                    "environment variable {name} is not set (write ${{{name}:-default}} for a default)"
                ));
            }
        }
        changed = true;
        rest = &rest[i + 3 + end..];
    }
    out.push_str(rest);
    Ok(changed.then_some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_expansion_leaves_attribute_templates_alone() {
        // set_var is unsafe in edition 2024 (and this crate forbids unsafe): use a variable
        // every environment has.
        let home = std::env::var("PATH").unwrap();
        assert_eq!(
            expand_str("a ${PATH} b").unwrap().unwrap(),
            format!("a {home} b")
        );
        assert_eq!(expand_str("${authentication.subject.id}").unwrap(), None);
        assert_eq!(expand_str("x $${PATH}").unwrap(), None);
        assert_eq!(
            expand_str("${GATEWAY_SURELY_UNSET_VAR:-fallback}")
                .unwrap()
                .unwrap(),
            "fallback"
        );
        assert!(
            expand_str("${GATEWAY_SURELY_UNSET_VAR}")
                .unwrap_err()
                .contains("GATEWAY_SURELY_UNSET_VAR")
        );
    }

    #[test]
    fn expanded_environment_values_never_reach_error_messages() {
        let dir = tempfile::tempdir().unwrap();
        // PATH stands in for a secret: it is set everywhere and expands into a wrong type.
        std::fs::write(
            dir.path().join("g.yaml"),
            "limits: { max_connections: \"${PATH}\" }\n",
        )
        .unwrap();
        let (_, errors) = load_dir_partial(dir.path(), &[]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        let e = errors[0].to_string();
        assert!(
            e.contains("limits.max_connections") && e.contains("invalid type"),
            "{e}"
        );
        assert!(!e.contains(&std::env::var("PATH").unwrap()), "{e}");
    }

    #[test]
    fn unknown_field_errors_point_at_the_key() {
        assert_eq!(
            join_error_path("limits", ".", "unknown field `foo`, expected x"),
            "limits.foo"
        );
        assert_eq!(
            join_error_path("policies[0]", "route", "unknown field `pth`, expected"),
            "policies[0].route.pth"
        );
        assert_eq!(join_error_path("a", "b[2]", "invalid type"), "a.b[2]");
    }
}
