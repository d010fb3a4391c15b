//! Test support: a small Kubernetes API server on loopback, enough for the
//! agent's client, and as strict as kube-apiserver on everything the agent
//! sends. It serves list and watch (resourceVersion, bookmarks, field
//! selectors) of pods, ConfigMaps, nodes and, when installed, OSM's
//! MeshConfig; get and patch of nodes; create and patch of events.k8s.io
//! Events. Tests drive it (put, delete, install or remove a resource, drop
//! every watch, expire resourceVersions to force a 410 Gone relist, deny
//! resources as RBAC would, fail a burst of requests with 5xx) and read
//! back every request it served (to check RBAC covers exactly those).
//!
//! What it checks, and the kube-apiserver sources it follows:
//! - list options, `k8s.io/apimachinery/pkg/apis/meta/internalversion/validation`
//!   `ValidateListOptions` (422): `resourceVersionMatch` only with
//!   `resourceVersion`, never with `continue`, `Exact` not with `0`; on a
//!   watch only with `sendInitialEvents`;
//! - field selectors: only the fields each resource supports (pods:
//!   `pkg/registry/core/pod/strategy.go` `ToSelectableFields`; ConfigMaps,
//!   custom resources: `metadata.name`, `metadata.namespace`), else 400
//!   `field label not supported`;
//! - a resource that is not served (a CRD not installed, or removed) is a
//!   404 on list, watch and every other verb; removing it deletes its
//!   objects first (DELETED to watchers, as the CRD finalizer does) and
//!   ends its watches;
//! - creates: a DNS-subdomain name (`apimachinery/pkg/api/validation`
//!   `NameIsDNSSubdomain`), the body's namespace the path's (400), the
//!   namespace existing (404, the `NamespaceLifecycle` admission), no
//!   duplicate name (409);
//! - Events (events.k8s.io/v1): `pkg/apis/core/validation/events.go`
//!   `ValidateEventCreate` / `legacyValidateEvent` / `ValidateEventUpdate`
//!   (422): eventTime, type Normal|Warning, reportingController a
//!   qualified name, reportingInstance/action/reason 1-128 bytes, note at
//!   most 1024 bytes (Go's `len`), series count >= 2 with
//!   lastObservedTime, the deprecated fields unset, the namespace of an
//!   Event about a cluster-scoped object `default` or `kube-system`, and on
//!   update every field but series unchanged;
//! - patches by Content-Type (`staging/src/k8s.io/apiserver/pkg/endpoints/handlers/patch.go`):
//!   merge patch (RFC 7386) and JSON patch (RFC 6902; a failed `test` is
//!   422), 404 for a missing object, 415 for another type;
//! - 403 Forbidden, worded as the RBAC authorizer words it, for resources
//!   a test denies; 5xx (`InternalError` / `ServiceUnavailable`) for a
//!   burst of requests.
//!
//! Plain HTTP/1.1, one request per connection, a thread per connection.
use std::{
    collections::{BTreeMap, BTreeSet},
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc, Condvar, Mutex,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use serde_json::{json, Value};

/// A resource the server serves: `group` "" is the core API.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Resource {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub kind: String,
    pub namespaced: bool,
}

impl Resource {
    pub fn new(group: &str, version: &str, plural: &str, kind: &str) -> Self {
        Self {
            group: group.into(),
            version: version.into(),
            plural: plural.into(),
            kind: kind.into(),
            namespaced: true,
        }
    }
    pub fn pods() -> Self {
        Self::new("", "v1", "pods", "Pod")
    }
    pub fn configmaps() -> Self {
        Self::new("", "v1", "configmaps", "ConfigMap")
    }
    pub fn nodes() -> Self {
        Self { namespaced: false, ..Self::new("", "v1", "nodes", "Node") }
    }
    pub fn meshconfigs() -> Self {
        Self::new("config.openservicemesh.io", "v1alpha2", "meshconfigs", "MeshConfig")
    }
    pub fn events() -> Self {
        Self::new("events.k8s.io", "v1", "events", "Event")
    }
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    /// The fields a field selector may name (see the module's
    /// documentation).
    fn selectable(&self, field: &str) -> bool {
        let meta = ["metadata.name", "metadata.namespace"].contains(&field);
        match (self.group.as_str(), self.plural.as_str()) {
            ("", "pods") => {
                meta || [
                    "spec.nodeName",
                    "spec.restartPolicy",
                    "spec.schedulerName",
                    "spec.serviceAccountName",
                    "spec.hostNetwork",
                    "status.phase",
                    "status.podIP",
                    "status.podIPs",
                    "status.nominatedNodeName",
                ]
                .contains(&field)
            }
            ("", "nodes") => field == "metadata.name" || field == "spec.unschedulable",
            _ => meta,
        }
    }
}

/// One request the server answered: method, resource plural, group,
/// namespace (if namespaced), and the verb RBAC would check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Served {
    pub method: String,
    pub path: String,
    pub group: String,
    pub resource: String,
    pub namespace: Option<String>,
    /// The object named in the path, or by a `metadata.name` field
    /// selector (what RBAC's resourceNames match).
    pub name: Option<String>,
    /// get, list, watch, create, patch, update, delete.
    pub verb: String,
    pub status: u16,
    /// The query's `resourceVersion` and `resourceVersionMatch`.
    pub resource_version: Option<String>,
    pub resource_version_match: Option<String>,
    pub content_type: Option<String>,
}

#[derive(Default)]
struct Collection {
    objects: BTreeMap<(String, String), Value>,
    /// (resourceVersion, type, object) of every change.
    log: Vec<(u64, &'static str, Value)>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Every resource the server knows; those in `served` are installed.
    resources: BTreeMap<Resource, Collection>,
    served: BTreeSet<Resource>,
    namespaces: BTreeSet<String>,
    /// Watches asking for a resourceVersion below this get 410 Gone.
    expired_below: u64,
    /// Bumped to end every open watch.
    generation: u64,
    requests: Vec<Served>,
    next_uid: u64,
    /// The test process and this server's port: the UIDs of two servers
    /// never meet, also across test runs on one machine (the agent finds
    /// pods in /proc by their UID).
    uid_prefix: (u32, u16),
    /// Denied as RBAC would (403), every verb.
    forbidden: BTreeSet<Resource>,
    /// The next requests answered with this 5xx status.
    failing: Option<(u16, usize)>,
}

/// A self-signed certificate (`CN=redirector fake API (test only, plain
/// HTTP)`, no key kept), base64 PEM, for [`FakeApi::write_kubeconfig`].
const UNUSED_CA: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJ3akNDQVdtZ0F3SUJBZ0lVR2RoVmJiSHhvSXh0c0xOZG5URzY2eFBvdTYwd0NnWUlLb1pJemowRUF3SXcKTmpFME1ESUdBMVVFQXd3cmNtVmthWEpsWTNSdmNpQm1ZV3RsSUVGUVNTQW9kR1Z6ZENCdmJteDVMQ0J3YkdGcApiaUJJVkZSUUtUQWdGdzB5TmpFeE1qTXhOekUxTlROYUdBOHlNVEkyTVRBek1ERTNNVFUxTTFvd05qRTBNRElHCkExVUVBd3dyY21Wa2FYSmxZM1J2Y2lCbVlXdGxJRUZRU1NBb2RHVnpkQ0J2Ym14NUxDQndiR0ZwYmlCSVZGUlEKS1RCWk1CTUdCeXFHU000OUFnRUdDQ3FHU000OUF3RUhBMElBQkhFR3lqbS9VbDNyMUtFbEtacVNTVEtkNnFyNwo4MEZHYmJHaHE3VDFlMTQ5aVBIQmEvNTdINGc1SjlVUDFuWlBmOUlnektTUXRzN1JCQ2JiZXoxT0JYbWpVekJSCk1CMEdBMVVkRGdRV0JCUkNxd3BzVUxDQjNkNjAwcEROUVRBeGJJRnE5ekFmQmdOVkhTTUVHREFXZ0JSQ3F3cHMKVUxDQjNkNjAwcEROUVRBeGJJRnE5ekFQQmdOVkhSTUJBZjhFQlRBREFRSC9NQW9HQ0NxR1NNNDlCQU1DQTBjQQpNRVFDSUMxT1I3ejFxSXJXa3hrT0sxQ0FYZzRXbExnWUhvTWIyVHkwd1FNT2FCekJBaUJ0cEhUMVgybVVuamdpCjV1MC9ST1lDM1lkL29xMXRNQ1hWczc0SzUyYUNOdz09Ci0tLS0tRU5EIENFUlRJRklDQVRFLS0tLS0K";

/// The service account the agent runs as, in 403 messages.
const USER: &str = "system:serviceaccount:redirector-system:redirector";

pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApi {
    /// Serves `resources` (plus events and nodes) on 127.0.0.1, on a free
    /// port. [`Resource::meshconfigs`] is known either way: when it is not
    /// in `resources`, its CRD is "not installed" until
    /// [`FakeApi::install`].
    pub fn start(resources: &[Resource]) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the fake API server")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let mut st = State { rv: 100, uid_prefix: (std::process::id(), addr.port()), ..Default::default() };
        for r in resources.iter().cloned().chain([Resource::events(), Resource::nodes()]) {
            st.resources.insert(r.clone(), Collection::default());
            st.served.insert(r);
        }
        st.resources.entry(Resource::meshconfigs()).or_default();
        st.namespaces.extend(["default".to_string(), "kube-system".to_string()]);
        let state = Arc::new((Mutex::new(st), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s2, stop2) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !stop2.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (s3, stop3) = (s2.clone(), stop2.clone());
                        std::thread::spawn(move || {
                            let _ = serve(conn, &s3, &stop3);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Ok(Self { addr, state, stop, thread: Some(thread) })
    }

    /// A kubeconfig file pointing at this server (no credentials). It
    /// names a CA, as every real kubeconfig and in-cluster config does:
    /// without one the client falls back to the system's trust store,
    /// which a minimal machine (the kernel-VM guest) does not have. The
    /// server is plain HTTP; the certificate is never used.
    pub fn write_kubeconfig(&self, path: &Path) -> Result<()> {
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n    certificate-authority-data: {UNUSED_CA}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        );
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (m, cv) = &*self.state;
        let mut st = m.lock().unwrap();
        let out = f(&mut st);
        cv.notify_all();
        out
    }

    /// Creates or replaces an object (ADDED or MODIFIED for watchers); sets
    /// its resourceVersion (and a UID if it has none); its namespace
    /// exists from then on. Returns the object.
    pub fn put(&self, res: &Resource, obj: Value) -> Value {
        put_in(&self.state, res, obj)
    }

    /// Deletes an object (DELETED for watchers).
    pub fn delete(&self, res: &Resource, namespace: &str, name: &str) {
        self.with(|st| delete_in(st, res, namespace, name))
    }

    pub fn get(&self, res: &Resource, namespace: &str, name: &str) -> Option<Value> {
        self.with(|st| st.resources[res].objects.get(&(namespace.to_string(), name.to_string())).cloned())
    }

    /// Serves `res` from now on (a CRD installed).
    pub fn install(&self, res: &Resource) {
        self.with(|st| {
            st.resources.entry(res.clone()).or_default();
            st.served.insert(res.clone());
        })
    }

    /// Stops serving `res` (a CRD deleted): its objects are deleted first
    /// (DELETED to watchers), then its watches end and every request is a
    /// 404.
    pub fn uninstall(&self, res: &Resource) {
        let keys: Vec<(String, String)> = self.with(|st| st.resources[res].objects.keys().cloned().collect());
        for (ns, name) in keys {
            self.delete(res, &ns, &name);
        }
        // Let open watches send the DELETED events before they end.
        std::thread::sleep(Duration::from_millis(300));
        self.with(|st| {
            st.served.remove(res);
        });
    }

    /// Denies (403) every new request on these resources, as RBAC does
    /// before the agent's role or binding exists; `&[]` grants everything
    /// again. As with RBAC, watches already open go on (authorization is
    /// checked when a request starts): [`FakeApi::drop_watches`] ends them.
    pub fn forbid(&self, resources: &[Resource]) {
        self.with(|st| st.forbidden = resources.iter().cloned().collect())
    }

    /// Answers the next `n` requests (any resource) with `code` (500 or
    /// 503), as an overloaded or restarting API server does.
    pub fn fail_next(&self, n: usize, code: u16) {
        assert!(code == 500 || code == 503, "a 5xx burst is 500 or 503");
        self.with(|st| st.failing = Some((code, n)))
    }

    /// Ends every open watch (clients resume from their last
    /// resourceVersion).
    pub fn drop_watches(&self) {
        self.with(|st| st.generation += 1);
    }

    /// Ends every open watch and makes every resourceVersion seen so far
    /// too old: resuming gets 410 Gone, so clients must list again.
    pub fn expire_watches(&self) {
        self.with(|st| {
            st.expired_below = st.rv + 1;
            st.generation += 1;
        });
    }

    pub fn served(&self) -> Vec<Served> {
        self.with(|st| st.requests.clone())
    }

    /// Every Event object created or patched.
    pub fn events(&self) -> Vec<Value> {
        self.with(|st| st.resources[&Resource::events()].objects.values().cloned().collect())
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.drop_watches();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn put_in(state: &(Mutex<State>, Condvar), res: &Resource, obj: Value) -> Value {
    let (m, cv) = state;
    let mut st = m.lock().unwrap();
    let out = store(&mut st, res, obj);
    cv.notify_all();
    out
}

fn store(st: &mut State, res: &Resource, mut obj: Value) -> Value {
    st.rv += 1;
    let rv = st.rv;
    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string();
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).expect("object has a name").to_string();
    if obj.pointer("/metadata/uid").is_none() {
        st.next_uid += 1;
        obj["metadata"]["uid"] =
            json!(format!("{:08x}-{:04x}-4000-8000-{:012x}", st.uid_prefix.0, st.uid_prefix.1, st.next_uid));
    }
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    obj["apiVersion"] = json!(res.api_version());
    obj["kind"] = json!(res.kind);
    if !ns.is_empty() {
        st.namespaces.insert(ns.clone());
    }
    let c = st.resources.get_mut(res).expect("resource registered");
    let kind = if c.objects.contains_key(&(ns.clone(), name.clone())) { "MODIFIED" } else { "ADDED" };
    c.objects.insert((ns, name), obj.clone());
    c.log.push((rv, kind, obj.clone()));
    obj
}

fn delete_in(st: &mut State, res: &Resource, namespace: &str, name: &str) {
    st.rv += 1;
    let rv = st.rv;
    let c = st.resources.get_mut(res).expect("resource registered");
    if let Some(mut obj) = c.objects.remove(&(namespace.to_string(), name.to_string())) {
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        c.log.push((rv, "DELETED", obj));
    }
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
    content_type: Option<String>,
    body: Vec<u8>,
}

fn read_request(conn: &TcpStream) -> Result<Request> {
    let mut rd = BufReader::new(conn.try_clone()?);
    let mut line = String::new();
    rd.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let target = parts.next().unwrap_or_default().to_string();
    let mut len = 0usize;
    let mut content_type = None;
    loop {
        let mut h = String::new();
        if rd.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
            }
            if k.eq_ignore_ascii_case("content-type") {
                content_type = Some(v.trim().split(';').next().unwrap_or("").trim().to_string());
            }
        }
    }
    let mut body = vec![0; len];
    rd.read_exact(&mut body)?;
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query = q
        .split('&')
        .filter(|kv| !kv.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            (unescape(k), unescape(v))
        })
        .collect();
    Ok(Request { method, path: path.to_string(), query, content_type, body })
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
                match u8::from_str_radix(hex, 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// (group, version, namespace, plural, name) of a request path.
type Route = (String, String, Option<String>, String, Option<String>);

/// `/api/v1[/namespaces/NS]/PLURAL[/NAME]` or the same under `/apis/G/V`.
fn route(path: &str) -> Option<Route> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segs.as_slice() {
        ["api", v, rest @ ..] => (String::new(), v.to_string(), rest),
        ["apis", g, v, rest @ ..] => (g.to_string(), v.to_string(), rest),
        _ => return None,
    };
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        r => (None, r),
    };
    match rest {
        [plural] => Some((group, version, ns, plural.to_string(), None)),
        [plural, name] => Some((group, version, ns, plural.to_string(), Some(name.to_string()))),
        _ => None,
    }
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

/// A 422 `Invalid` Status for `kind` `name` with field errors
/// (`apimachinery/pkg/api/errors` `NewInvalid`).
fn invalid(kind: &str, name: &str, errors: &[String]) -> Value {
    let detail = if errors.len() == 1 { errors[0].clone() } else { format!("[{}]", errors.join(", ")) };
    status(422, "Invalid", &format!("{kind} {name:?} is invalid: {detail}"))
}

fn respond(conn: &mut TcpStream, code: u16, body: &Value) -> Result<()> {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Entity",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    };
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    Ok(())
}

/// The terms of a field selector: (field, value), or the 400 for one the
/// resource does not support.
fn field_terms(res: &Resource, sel: Option<&String>) -> Result<Vec<(String, String)>, Value> {
    let Some(sel) = sel else { return Ok(Vec::new()) };
    sel.split(',')
        .filter(|t| !t.is_empty())
        .map(|term| {
            let (k, v) = term.split_once("==").or_else(|| term.split_once('=')).unwrap_or((term, ""));
            if res.selectable(k) {
                Ok((k.to_string(), v.to_string()))
            } else {
                Err(status(400, "BadRequest", &format!("field label not supported: {k}")))
            }
        })
        .collect()
}

/// Whether `obj` passes the request's namespace and field selector.
fn selected(obj: &Value, ns: &Option<String>, terms: &[(String, String)]) -> bool {
    let get = |p: &str| match obj.pointer(p) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Bool(b)) => b.to_string(),
        _ => String::new(),
    };
    if let Some(ns) = ns {
        if &get("/metadata/namespace") != ns {
            return false;
        }
    }
    terms.iter().all(|(k, v)| get(&format!("/{}", k.replace('.', "/"))) == *v)
}

/// `ValidateListOptions` (see the module's documentation): the errors of
/// a list's or a watch's query.
fn list_option_errors(q: &BTreeMap<String, String>, watch: bool) -> Vec<String> {
    let get = |k: &str| q.get(k).map(String::as_str).unwrap_or("");
    let (rv, rvm) = (get("resourceVersion"), get("resourceVersionMatch"));
    let mut errs = Vec::new();
    if watch {
        if !rvm.is_empty() && !q.contains_key("sendInitialEvents") {
            errs.push(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden for watch unless sendInitialEvents is provided"
                    .into(),
            );
        }
        return errs;
    }
    if !rvm.is_empty() {
        if rv.is_empty() {
            errs.push(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden unless resourceVersion is provided"
                    .into(),
            );
        }
        if !get("continue").is_empty() {
            errs.push(
                "resourceVersionMatch: Forbidden: resourceVersionMatch is forbidden when continue is provided".into(),
            );
        }
        if rvm != "Exact" && rvm != "NotOlderThan" {
            errs.push(format!(
                "resourceVersionMatch: Unsupported value: {rvm:?}: supported values: \"Exact\", \"NotOlderThan\", \"\""
            ));
        }
        if rvm == "Exact" && rv == "0" {
            errs.push(
                "resourceVersionMatch: Forbidden: resourceVersionMatch \"exact\" is forbidden for resourceVersion \"0\""
                    .into(),
            );
        }
    }
    if q.contains_key("sendInitialEvents") {
        errs.push("sendInitialEvents: Forbidden: sendInitialEvents is forbidden for list".into());
    }
    errs
}

/// `IsDNS1123Subdomain` (`apimachinery/pkg/util/validation`).
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label_part)
}

fn is_dns_label_part(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// `IsDNS1123Label`: a namespace's name.
pub fn is_dns_label(s: &str) -> bool {
    is_dns_label_part(s)
}

/// `IsQualifiedName`: `[prefix/]name`, prefix a DNS subdomain, name 1-63
/// of `[A-Za-z0-9_.-]`, alphanumeric at both ends.
pub fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.split_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    prefix.is_none_or(is_dns_subdomain)
        && !name.is_empty()
        && name.len() <= 63
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && edge(name.chars().next())
        && edge(name.chars().last())
}

/// The field errors kube-apiserver finds in an events.k8s.io/v1 Event
/// being created in `namespace` (`ValidateEventCreate`).
pub fn event_create_errors(ev: &Value, namespace: &str) -> Vec<String> {
    let s = |p: &str| ev.pointer(p).and_then(Value::as_str).unwrap_or("");
    let mut errs = Vec::new();
    let name = s("/metadata/name");
    if !is_dns_subdomain(name) {
        errs.push(format!("metadata.name: Invalid value: {name:?}: a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'"));
    }
    if s("/eventTime").is_empty() {
        errs.push("eventTime: Required value".into());
    }
    if !["Normal", "Warning"].contains(&s("/type")) {
        errs.push(format!("type: Invalid value: \"\": has invalid value: {}", s("/type")));
    }
    for deprecated in ["deprecatedFirstTimestamp", "deprecatedLastTimestamp", "deprecatedSource"] {
        if ev.get(deprecated).is_some_and(|v| !v.is_null()) {
            errs.push(format!("{deprecated}: Invalid value: \"\": needs to be unset"));
        }
    }
    if ev.get("deprecatedCount").and_then(Value::as_i64).is_some_and(|c| c != 0) {
        errs.push("count: Invalid value: \"\": needs to be unset".into());
    }
    errs.extend(series_errors(ev));
    // legacyValidateEvent, the branch of an Event with eventTime.
    if s("/regarding/namespace").is_empty() && namespace != "default" && namespace != "kube-system" {
        errs.push("involvedObject.namespace: Invalid value: \"\": does not match event.namespace".into());
    }
    let controller = s("/reportingController");
    if controller.is_empty() {
        errs.push("reportingController: Required value".into());
    } else if !is_qualified_name(controller) {
        errs.push(format!("reportingController: Invalid value: {controller:?}: must be a qualified name"));
    }
    for (field, limit) in [("reportingInstance", 128), ("action", 128), ("reason", 128)] {
        let v = s(&format!("/{field}"));
        if v.is_empty() {
            errs.push(format!("{field}: Required value"));
        }
        if v.len() > limit {
            errs.push(format!("{field}: Invalid value: \"\": can have at most {limit} characters"));
        }
    }
    // Go's len(): bytes.
    if s("/note").len() > 1024 {
        errs.push("message: Invalid value: \"\": can have at most 1024 characters".into());
    }
    if !is_dns_subdomain(namespace) {
        errs.push(format!("namespace: Invalid value: {namespace:?}"));
    }
    errs
}

fn series_errors(ev: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    if let Some(series) = ev.get("series").filter(|v| !v.is_null()) {
        if series.get("count").and_then(Value::as_i64).unwrap_or(0) < 2 {
            errs.push("series.count: Invalid value: \"\": should be at least 2".into());
        }
        if series.get("lastObservedTime").and_then(Value::as_str).unwrap_or("").is_empty() {
            errs.push("series.lastObservedTime: Required value".into());
        }
    }
    errs
}

/// `ValidateEventUpdate`: a new series is validated, every other field
/// is immutable.
pub fn event_update_errors(new: &Value, old: &Value) -> Vec<String> {
    let mut errs = Vec::new();
    if new.get("series") != old.get("series") {
        errs.extend(series_errors(new));
    }
    for field in [
        "regarding",
        "related",
        "reason",
        "note",
        "type",
        "eventTime",
        "action",
        "reportingController",
        "reportingInstance",
        "deprecatedSource",
        "deprecatedFirstTimestamp",
        "deprecatedLastTimestamp",
        "deprecatedCount",
    ] {
        if new.get(field) != old.get(field) {
            errs.push(format!("{field}: Invalid value: field is immutable"));
        }
    }
    errs
}

/// RFC 7386 merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge_patch(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

/// RFC 6902 JSON patch: test, replace, add, remove on object paths and
/// array indices; an error names the failed operation.
fn json_patch(target: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch is an array of operations")?;
    for op in ops {
        let path = op["path"].as_str().ok_or("an operation without a path")?;
        let parts: Vec<String> = path.split('/').skip(1).map(|p| p.replace("~1", "/").replace("~0", "~")).collect();
        let (last, parents) = parts.split_last().ok_or("an operation on the whole document")?;
        let mut parent = &mut *target;
        for p in parents {
            parent = match parent {
                Value::Object(m) => m.get_mut(p),
                Value::Array(a) => p.parse::<usize>().ok().and_then(|i| a.get_mut(i)),
                _ => None,
            }
            .ok_or_else(|| format!("doc is missing path: {path:?}"))?;
        }
        let kind = op["op"].as_str().unwrap_or("");
        let current = match parent {
            Value::Object(m) => m.get(last).cloned(),
            Value::Array(a) => last.parse::<usize>().ok().and_then(|i| a.get(i)).cloned(),
            _ => None,
        };
        match kind {
            "test" => {
                if current.as_ref() != Some(&op["value"]) {
                    return Err(format!("testing value {path} failed: test failed"));
                }
            }
            "replace" | "add" | "remove" => {
                if kind != "add" && current.is_none() {
                    return Err(format!("{kind} operation does not apply: doc is missing path: {path:?}"));
                }
                match parent {
                    Value::Object(m) if kind == "remove" => {
                        m.remove(last);
                    }
                    Value::Object(m) => {
                        m.insert(last.clone(), op["value"].clone());
                    }
                    _ => return Err(format!("unsupported operation on {path:?}")),
                }
            }
            other => return Err(format!("unexpected kind: {other}")),
        }
    }
    Ok(())
}

fn serve(mut conn: TcpStream, state: &Arc<(Mutex<State>, Condvar)>, stop: &AtomicBool) -> Result<()> {
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let req = read_request(&conn)?;
    let (m, cv) = &**state;
    let Some((group, version, ns, plural, name)) = route(&req.path) else {
        return respond(&mut conn, 404, &status(404, "NotFound", &format!("no route {}", req.path)));
    };
    let watch = matches!(req.query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (req.method.as_str(), &name, watch) {
        ("GET", _, true) => "watch",
        ("GET", Some(_), false) => "get",
        ("GET", None, false) => "list",
        ("POST", _, _) => "create",
        ("PATCH", _, _) => "patch",
        ("PUT", _, _) => "update",
        ("DELETE", _, _) => "delete",
        _ => "unknown",
    };
    let mut st = m.lock().unwrap();
    let selected_name = name.clone().or_else(|| {
        req.query.get("fieldSelector")?.split(',').find_map(|t| {
            t.strip_prefix("metadata.name==").or_else(|| t.strip_prefix("metadata.name=")).map(str::to_string)
        })
    });
    let record = |st: &mut State, code: u16| {
        st.requests.push(Served {
            name: selected_name.clone(),
            method: req.method.clone(),
            path: req.path.clone(),
            group: group.clone(),
            resource: plural.clone(),
            namespace: ns.clone(),
            verb: verb.to_string(),
            status: code,
            resource_version: req.query.get("resourceVersion").cloned(),
            resource_version_match: req.query.get("resourceVersionMatch").cloned(),
            content_type: req.content_type.clone(),
        })
    };
    macro_rules! answer {
        ($code:expr, $body:expr) => {{
            let code: u16 = $code;
            record(&mut st, code);
            drop(st);
            return respond(&mut conn, code, &$body);
        }};
    }
    if let Some((code, left)) = st.failing {
        st.failing = if left > 1 { Some((code, left - 1)) } else { None };
        let (reason, msg) = match code {
            503 => ("ServiceUnavailable", "the server is currently unable to handle the request"),
            _ => ("InternalError", "Internal error occurred: etcdserver: request timed out"),
        };
        answer!(code, status(code, reason, msg));
    }
    let res = st
        .resources
        .keys()
        .find(|r| r.group == group && r.version == version && r.plural == plural && st.served.contains(*r))
        .cloned();
    let Some(res) = res else {
        answer!(
            404,
            status(404, "NotFound", &format!("the server could not find the requested resource ({plural}.{group})"))
        );
    };
    if st.forbidden.contains(&res) {
        let scope = match &ns {
            Some(n) => format!("in the namespace {n:?}"),
            None => "at the cluster scope".into(),
        };
        let msg = format!(
            "{plural}{} is forbidden: User {USER:?} cannot {verb} resource {plural:?} in API group {group:?} {scope}",
            name.as_ref().map(|n| format!(" {n:?}")).unwrap_or_default()
        );
        answer!(403, status(403, "Forbidden", &msg));
    }
    if let Some(n) = &ns {
        if !res.namespaced {
            answer!(404, status(404, "NotFound", &format!("{plural} is not namespaced")));
        }
        if !is_dns_label(n) {
            answer!(400, status(400, "BadRequest", &format!("invalid namespace {n:?}")));
        }
    }
    if ["list", "watch"].contains(&verb) {
        let errs = list_option_errors(&req.query, watch);
        if !errs.is_empty() {
            answer!(422, invalid("ListOptions.meta.k8s.io", "", &errs));
        }
    }
    let terms = match field_terms(&res, req.query.get("fieldSelector")) {
        Ok(t) => t,
        Err(e) => answer!(400, e),
    };
    let key = (ns.clone().unwrap_or_default(), name.clone().unwrap_or_default());
    let kind_of = |res: &Resource| {
        if res.group.is_empty() {
            res.kind.clone()
        } else {
            format!("{}.{}", res.kind, res.group)
        }
    };
    match verb {
        "list" => {
            let items: Vec<Value> =
                st.resources[&res].objects.values().filter(|o| selected(o, &ns, &terms)).cloned().collect();
            let body = json!({"apiVersion": res.api_version(), "kind": format!("{}List", res.kind),
                              "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
            answer!(200, body)
        }
        "get" => match st.resources[&res].objects.get(&key).cloned() {
            Some(o) => answer!(200, o),
            None => answer!(404, status(404, "NotFound", &format!("{plural} {:?} not found", key.1))),
        },
        "create" => {
            let Ok(mut obj) = serde_json::from_slice::<Value>(&req.body) else {
                answer!(400, status(400, "BadRequest", "the body is not a JSON object"));
            };
            let body_ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).map(str::to_string);
            let path_ns = ns.clone().unwrap_or_default();
            if body_ns.as_ref().is_some_and(|b| b != &path_ns) {
                answer!(
                    400,
                    status(
                        400,
                        "BadRequest",
                        "the namespace of the provided object does not match the namespace sent on the request"
                    )
                );
            }
            if res.namespaced && !st.namespaces.contains(&path_ns) {
                answer!(404, status(404, "NotFound", &format!("namespaces {path_ns:?} not found")));
            }
            obj["metadata"]["namespace"] = json!(path_ns);
            let obj_name = obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("").to_string();
            let mut errs = Vec::new();
            if res == Resource::events() {
                errs = event_create_errors(&obj, &path_ns);
            } else if !is_dns_subdomain(&obj_name) {
                errs.push(format!("metadata.name: Invalid value: {obj_name:?}"));
            }
            if !errs.is_empty() {
                answer!(422, invalid(&kind_of(&res), &obj_name, &errs));
            }
            if st.resources[&res].objects.contains_key(&(path_ns.clone(), obj_name.clone())) {
                answer!(409, status(409, "AlreadyExists", &format!("{plural} {obj_name:?} already exists")));
            }
            let stored = store(&mut st, &res, obj);
            cv.notify_all();
            answer!(201, stored)
        }
        "patch" => {
            let Some(old) = st.resources[&res].objects.get(&key).cloned() else {
                answer!(404, status(404, "NotFound", &format!("{plural} {:?} not found", key.1)));
            };
            let Ok(patch) = serde_json::from_slice::<Value>(&req.body) else {
                answer!(400, status(400, "BadRequest", "the patch is not JSON"));
            };
            let mut new = old.clone();
            match req.content_type.as_deref() {
                Some("application/merge-patch+json") => merge_patch(&mut new, &patch),
                Some("application/json-patch+json") => {
                    if let Err(e) = json_patch(&mut new, &patch) {
                        answer!(422, status(422, "", &e));
                    }
                }
                other => answer!(
                    415,
                    status(
                        415,
                        "UnsupportedMediaType",
                        &format!("the body of the request was in an unknown format ({other:?})")
                    )
                ),
            }
            // The patch cannot move or rename the object.
            new["metadata"]["name"] = old["metadata"]["name"].clone();
            new["metadata"]["namespace"] = old["metadata"]["namespace"].clone();
            new["metadata"]["uid"] = old["metadata"]["uid"].clone();
            if res == Resource::events() {
                let errs = event_update_errors(&new, &old);
                if !errs.is_empty() {
                    answer!(422, invalid(&kind_of(&res), &key.1, &errs));
                }
            }
            let stored = store(&mut st, &res, new);
            cv.notify_all();
            answer!(200, stored)
        }
        "watch" => {
            record(&mut st, 200);
            let from: u64 = req.query.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let bookmarks = req.query.get("allowWatchBookmarks").is_some_and(|v| v == "true");
            let timeout =
                Duration::from_secs(req.query.get("timeoutSeconds").and_then(|v| v.parse().ok()).unwrap_or(290));
            let generation = st.generation;
            let expired = from != 0 && from < st.expired_below;
            drop(st);
            conn.set_read_timeout(None)?;
            write!(conn, "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")?;
            let mut send = |v: Value| -> std::io::Result<()> {
                let line = format!("{v}\n");
                write!(conn, "{:x}\r\n{line}\r\n", line.len())?;
                conn.flush()
            };
            if expired {
                send(
                    json!({"type": "ERROR", "object": status(410, "Expired", &format!("too old resource version: {from}"))}),
                )?;
                return write!(conn, "0\r\n\r\n").map_err(Into::into);
            }
            let started = Instant::now();
            let mut sent_up_to = from;
            let mut last_bookmark = Instant::now();
            loop {
                let mut st = m.lock().unwrap();
                let pending: Vec<(u64, &'static str, Value)> = st.resources[&res]
                    .log
                    .iter()
                    .filter(|(rv, _, o)| *rv > sent_up_to && selected(o, &ns, &terms))
                    .cloned()
                    .collect();
                let newest = st.rv;
                if pending.is_empty() {
                    if st.generation != generation
                        || !st.served.contains(&res)
                        || stop.load(Ordering::Relaxed)
                        || started.elapsed() > timeout
                    {
                        break;
                    }
                    let due = bookmarks && last_bookmark.elapsed() > Duration::from_secs(1);
                    if !due {
                        st = cv.wait_timeout(st, Duration::from_millis(200)).unwrap().0;
                        drop(st);
                        continue;
                    }
                    drop(st);
                    last_bookmark = Instant::now();
                    sent_up_to = sent_up_to.max(newest);
                    send(json!({"type": "BOOKMARK", "object": {"apiVersion": res.api_version(), "kind": res.kind,
                                "metadata": {"resourceVersion": newest.to_string()}}}))?;
                    continue;
                }
                drop(st);
                for (rv, kind, obj) in pending {
                    send(json!({"type": kind, "object": obj}))?;
                    sent_up_to = rv;
                }
            }
            write!(conn, "0\r\n\r\n")?;
            Ok(())
        }
        _ => answer!(405, status(405, "MethodNotAllowed", &req.method)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_selectors() {
        assert_eq!(route("/api/v1/pods"), Some(("".into(), "v1".into(), None, "pods".into(), None)));
        assert_eq!(
            route("/apis/events.k8s.io/v1/namespaces/shop/events/web.1"),
            Some(("events.k8s.io".into(), "v1".into(), Some("shop".into()), "events".into(), Some("web.1".into())))
        );
        assert_eq!(unescape("spec.nodeName%3Dnode-1"), "spec.nodeName=node-1");
        let pod = json!({"metadata": {"name": "a", "namespace": "x"}, "spec": {"nodeName": "n1"}});
        let terms = |s: &str| field_terms(&Resource::pods(), Some(&s.to_string())).unwrap();
        assert!(selected(&pod, &Some("x".into()), &terms("spec.nodeName=n1")));
        assert!(!selected(&pod, &None, &terms("spec.nodeName=n2")));
        assert!(!selected(&pod, &Some("y".into()), &[]));
        let e = field_terms(&Resource::configmaps(), Some(&"spec.nodeName=n1".to_string())).unwrap_err();
        assert_eq!(e["code"], 400);
        assert!(e["message"].as_str().unwrap().contains("field label not supported: spec.nodeName"));
    }

    #[test]
    fn list_options_as_the_api_server_validates_them() {
        let q = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        assert!(list_option_errors(&q(&[("resourceVersion", "0"), ("resourceVersionMatch", "NotOlderThan")]), false)
            .is_empty());
        assert!(list_option_errors(&q(&[]), false).is_empty());
        for bad in [
            &[("resourceVersionMatch", "NotOlderThan")][..],
            &[("resourceVersion", "0"), ("resourceVersionMatch", "Exact")],
            &[("resourceVersion", "5"), ("resourceVersionMatch", "Newest")],
            &[("resourceVersion", "5"), ("resourceVersionMatch", "NotOlderThan"), ("continue", "x")],
            &[("sendInitialEvents", "true")],
        ] {
            assert!(!list_option_errors(&q(bad), false).is_empty(), "{bad:?}");
        }
        assert!(!list_option_errors(&q(&[("resourceVersion", "5"), ("resourceVersionMatch", "NotOlderThan")]), true)
            .is_empty());
    }

    fn event() -> Value {
        json!({
            "metadata": {"name": "web-1.17979cfe3d85cd15", "namespace": "shop"},
            "eventTime": "2026-01-01T00:00:00.000000Z", "type": "Warning", "reason": "InvalidAnnotation",
            "action": "Redirect", "note": "bad", "reportingController": "redirector.dev/agent",
            "reportingInstance": "redirector-abcde",
            "regarding": {"kind": "Pod", "namespace": "shop", "name": "web-1", "uid": "u1"}
        })
    }

    #[test]
    fn events_as_the_api_server_validates_them() {
        assert_eq!(event_create_errors(&event(), "shop"), Vec::<String>::new());
        let with = |path: &str, v: Value| {
            let mut e = event();
            *e.pointer_mut(path).unwrap_or_else(|| panic!("{path}")) = v;
            e
        };
        // 1024 bytes of 2-byte characters are accepted, one byte more is not.
        assert!(event_create_errors(&with("/note", json!("é".repeat(512))), "shop").is_empty());
        let over = format!("{}x", "é".repeat(512));
        assert!(event_create_errors(&with("/note", json!(over)), "shop")[0].contains("at most 1024"));
        for (path, v, want) in [
            ("/metadata/name", json!("Web_1"), "metadata.name"),
            ("/type", json!("Error"), "type"),
            ("/reason", json!(""), "reason: Required"),
            ("/action", json!("a".repeat(129)), "action"),
            ("/reportingInstance", json!("i".repeat(129)), "reportingInstance"),
            ("/reportingController", json!("Bad Controller"), "reportingController"),
            ("/reportingController", json!(""), "reportingController: Required"),
            ("/eventTime", json!(null), "eventTime"),
        ] {
            let errs = event_create_errors(&with(path, v), "shop");
            assert!(errs.iter().any(|e| e.contains(want)), "{path}: {errs:?}");
        }
        // Events about a cluster-scoped object live in default.
        let node = with("/regarding", json!({"kind": "Node", "name": "n1"}));
        assert!(event_create_errors(&node, "default").is_empty());
        assert!(!event_create_errors(&node, "shop").is_empty());
        let series = |count: i64| {
            with("/note", json!("bad")).as_object().cloned().map(|mut o| {
                o.insert("series".into(), json!({"count": count, "lastObservedTime": "2026-01-01T01:00:00.000000Z"}));
                Value::Object(o)
            })
        };
        assert!(event_update_errors(&series(2).unwrap(), &event()).is_empty());
        assert!(!event_update_errors(&series(1).unwrap(), &event()).is_empty());
        assert!(!event_update_errors(&with("/note", json!("other")), &event()).is_empty(), "note is immutable");
        assert!(is_qualified_name("redirector") && is_qualified_name("redirector.dev/agent"));
        assert!(!is_qualified_name("redirector.dev/") && !is_qualified_name("-x") && !is_qualified_name("A_B/x"));
    }

    #[test]
    fn patches() {
        let mut node = json!({"spec": {"taints": [{"key": "a", "effect": "NoSchedule"}, {"key": "b"}]}});
        let ops = json!([{"op": "test", "path": "/spec/taints", "value": [{"key": "a", "effect": "NoSchedule"}]},
                         {"op": "replace", "path": "/spec/taints", "value": []}]);
        assert!(json_patch(&mut node.clone(), &ops).unwrap_err().contains("test failed"));
        let ops = json!([{"op": "test", "path": "/spec/taints", "value": node["spec"]["taints"].clone()},
                         {"op": "replace", "path": "/spec/taints", "value": [{"key": "b"}]}]);
        json_patch(&mut node, &ops).unwrap();
        assert_eq!(node["spec"]["taints"], json!([{"key": "b"}]));
        let mut ev = json!({"a": 1, "series": {"count": 2}});
        merge_patch(&mut ev, &json!({"series": {"count": 3}, "a": null}));
        assert_eq!(ev, json!({"series": {"count": 3}}));
    }
}
