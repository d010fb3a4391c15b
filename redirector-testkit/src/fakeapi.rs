//! Test support: a small Kubernetes API server on loopback, enough for the
//! agent's client: list and watch (with resourceVersion, bookmarks, field
//! selectors `metadata.name`, `metadata.namespace` and `spec.nodeName`) of
//! pods, ConfigMaps and, when registered, OSM's MeshConfig; create and
//! patch of events.k8s.io Events. Tests drive it (put, delete, drop every
//! watch, expire old resourceVersions to force a 410 Gone relist) and read
//! back every request it served (to check RBAC covers exactly those).
//!
//! Plain HTTP/1.1, one request per connection, a thread per connection.
use std::{
    collections::BTreeMap,
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
}

impl Resource {
    pub fn new(group: &str, version: &str, plural: &str, kind: &str) -> Self {
        Self { group: group.into(), version: version.into(), plural: plural.into(), kind: kind.into() }
    }
    pub fn pods() -> Self {
        Self::new("", "v1", "pods", "Pod")
    }
    pub fn configmaps() -> Self {
        Self::new("", "v1", "configmaps", "ConfigMap")
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
    resources: BTreeMap<Resource, Collection>,
    /// Watches asking for a resourceVersion below this get 410 Gone.
    expired_below: u64,
    /// Bumped to end every open watch.
    generation: u64,
    served: Vec<Served>,
    next_uid: u64,
}

/// A self-signed certificate (`CN=redirector fake API (test only, plain
/// HTTP)`, no key kept), base64 PEM, for [`FakeApi::write_kubeconfig`].
const UNUSED_CA: &str = "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURS0tLS0tCk1JSUJ3akNDQVdtZ0F3SUJBZ0lVR2RoVmJiSHhvSXh0c0xOZG5URzY2eFBvdTYwd0NnWUlLb1pJemowRUF3SXcKTmpFME1ESUdBMVVFQXd3cmNtVmthWEpsWTNSdmNpQm1ZV3RsSUVGUVNTQW9kR1Z6ZENCdmJteDVMQ0J3YkdGcApiaUJJVkZSUUtUQWdGdzB5TmpFeE1qTXhOekUxTlROYUdBOHlNVEkyTVRBek1ERTNNVFUxTTFvd05qRTBNRElHCkExVUVBd3dyY21Wa2FYSmxZM1J2Y2lCbVlXdGxJRUZRU1NBb2RHVnpkQ0J2Ym14NUxDQndiR0ZwYmlCSVZGUlEKS1RCWk1CTUdCeXFHU000OUFnRUdDQ3FHU000OUF3RUhBMElBQkhFR3lqbS9VbDNyMUtFbEtacVNTVEtkNnFyNwo4MEZHYmJHaHE3VDFlMTQ5aVBIQmEvNTdINGc1SjlVUDFuWlBmOUlnektTUXRzN1JCQ2JiZXoxT0JYbWpVekJSCk1CMEdBMVVkRGdRV0JCUkNxd3BzVUxDQjNkNjAwcEROUVRBeGJJRnE5ekFmQmdOVkhTTUVHREFXZ0JSQ3F3cHMKVUxDQjNkNjAwcEROUVRBeGJJRnE5ekFQQmdOVkhSTUJBZjhFQlRBREFRSC9NQW9HQ0NxR1NNNDlCQU1DQTBjQQpNRVFDSUMxT1I3ejFxSXJXa3hrT0sxQ0FYZzRXbExnWUhvTWIyVHkwd1FNT2FCekJBaUJ0cEhUMVgybVVuamdpCjV1MC9ST1lDM1lkL29xMXRNQ1hWczc0SzUyYUNOdz09Ci0tLS0tRU5EIENFUlRJRklDQVRFLS0tLS0K";

pub struct FakeApi {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FakeApi {
    /// Serves `resources` (plus events) on 127.0.0.1, on a free port.
    pub fn start(resources: &[Resource]) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").context("binding the fake API server")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let mut st = State { rv: 100, ..Default::default() };
        for r in resources.iter().cloned().chain([Resource::events()]) {
            st.resources.insert(r, Collection::default());
        }
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
    /// its resourceVersion (and a UID if it has none). Returns the object.
    pub fn put(&self, res: &Resource, obj: Value) -> Value {
        put_in(&self.state, res, obj)
    }

    /// Deletes an object (DELETED for watchers).
    pub fn delete(&self, res: &Resource, namespace: &str, name: &str) {
        self.with(|st| {
            st.rv += 1;
            let rv = st.rv;
            let c = st.resources.get_mut(res).expect("resource registered");
            if let Some(mut obj) = c.objects.remove(&(namespace.to_string(), name.to_string())) {
                obj["metadata"]["resourceVersion"] = json!(rv.to_string());
                c.log.push((rv, "DELETED", obj));
            }
        })
    }

    pub fn get(&self, res: &Resource, namespace: &str, name: &str) -> Option<Value> {
        self.with(|st| st.resources[res].objects.get(&(namespace.to_string(), name.to_string())).cloned())
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
        self.with(|st| st.served.clone())
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

fn put_in(state: &(Mutex<State>, Condvar), res: &Resource, mut obj: Value) -> Value {
    let (m, cv) = state;
    let mut st = m.lock().unwrap();
    st.rv += 1;
    let rv = st.rv;
    let ns = obj.pointer("/metadata/namespace").and_then(Value::as_str).unwrap_or("").to_string();
    let name = obj.pointer("/metadata/name").and_then(Value::as_str).expect("object has a name").to_string();
    if obj.pointer("/metadata/uid").is_none() {
        st.next_uid += 1;
        obj["metadata"]["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", st.next_uid));
    }
    obj["metadata"]["resourceVersion"] = json!(rv.to_string());
    obj["apiVersion"] = json!(res.api_version());
    obj["kind"] = json!(res.kind);
    let c = st.resources.get_mut(res).expect("resource registered");
    let kind = if c.objects.contains_key(&(ns.clone(), name.clone())) { "MODIFIED" } else { "ADDED" };
    c.objects.insert((ns, name), obj.clone());
    c.log.push((rv, kind, obj.clone()));
    cv.notify_all();
    obj
}

struct Request {
    method: String,
    path: String,
    query: BTreeMap<String, String>,
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
    loop {
        let mut h = String::new();
        if rd.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                len = v.trim().parse().unwrap_or(0);
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
    Ok(Request { method, path: path.to_string(), query, body })
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

fn respond(conn: &mut TcpStream, code: u16, body: &Value) -> Result<()> {
    let text = body.to_string();
    let reason = match code {
        200 => "OK",
        201 => "Created",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Error",
    };
    write!(
        conn,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
        text.len()
    )?;
    Ok(())
}

/// Whether `obj` passes the request's namespace and field selector.
fn selected(obj: &Value, ns: &Option<String>, fields: Option<&String>) -> bool {
    let get = |p: &str| obj.pointer(p).and_then(Value::as_str).unwrap_or("").to_string();
    if let Some(ns) = ns {
        if &get("/metadata/namespace") != ns {
            return false;
        }
    }
    let Some(sel) = fields else { return true };
    sel.split(',').filter(|t| !t.is_empty()).all(|term| {
        let (k, v) = term.split_once("==").or_else(|| term.split_once('=')).unwrap_or((term, ""));
        let have = match k {
            "metadata.name" => get("/metadata/name"),
            "metadata.namespace" => get("/metadata/namespace"),
            "spec.nodeName" => get("/spec/nodeName"),
            _ => return false,
        };
        have == v
    })
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
    let res = st.resources.keys().find(|r| r.group == group && r.version == version && r.plural == plural).cloned();
    let selected_name = name.clone().or_else(|| {
        req.query.get("fieldSelector")?.split(',').find_map(|t| {
            t.strip_prefix("metadata.name==").or_else(|| t.strip_prefix("metadata.name=")).map(str::to_string)
        })
    });
    let record = |st: &mut State, code: u16| {
        st.served.push(Served {
            name: selected_name.clone(),
            method: req.method.clone(),
            path: req.path.clone(),
            group: group.clone(),
            resource: plural.clone(),
            namespace: ns.clone(),
            verb: verb.to_string(),
            status: code,
        })
    };
    let Some(res) = res else {
        record(&mut st, 404);
        drop(st);
        return respond(
            &mut conn,
            404,
            &status(404, "NotFound", &format!("the server could not find the requested resource ({plural}.{group})")),
        );
    };
    let fields = req.query.get("fieldSelector");
    match verb {
        "list" => {
            record(&mut st, 200);
            let items: Vec<Value> =
                st.resources[&res].objects.values().filter(|o| selected(o, &ns, fields)).cloned().collect();
            let body = json!({"apiVersion": res.api_version(), "kind": format!("{}List", res.kind),
                              "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
            drop(st);
            respond(&mut conn, 200, &body)
        }
        "get" => {
            let key = (ns.clone().unwrap_or_default(), name.clone().unwrap_or_default());
            let found = st.resources[&res].objects.get(&key).cloned();
            record(&mut st, if found.is_some() { 200 } else { 404 });
            drop(st);
            match found {
                Some(o) => respond(&mut conn, 200, &o),
                None => respond(&mut conn, 404, &status(404, "NotFound", "not found")),
            }
        }
        "create" | "patch" => {
            record(&mut st, if verb == "create" { 201 } else { 200 });
            let mut obj: Value = serde_json::from_slice(&req.body).unwrap_or(json!({}));
            if verb == "patch" {
                // Merge the patch into the stored object (Events only).
                let key = (ns.clone().unwrap_or_default(), name.clone().unwrap_or_default());
                let mut base = st.resources[&res]
                    .objects
                    .get(&key)
                    .cloned()
                    .unwrap_or(json!({"metadata": {"name": key.1, "namespace": key.0}}));
                if let (Some(b), Some(p)) = (base.as_object_mut(), obj.as_object()) {
                    for (k, v) in p {
                        b.insert(k.clone(), v.clone());
                    }
                }
                obj = base;
            }
            if obj.pointer("/metadata/namespace").is_none() {
                obj["metadata"]["namespace"] = json!(ns.clone().unwrap_or_default());
            }
            drop(st);
            let stored = put_in(state, &res, obj);
            respond(&mut conn, if verb == "create" { 201 } else { 200 }, &stored)
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
                    .filter(|(rv, _, o)| *rv > sent_up_to && selected(o, &ns, fields))
                    .cloned()
                    .collect();
                let newest = st.rv;
                if pending.is_empty() {
                    if st.generation != generation || stop.load(Ordering::Relaxed) || started.elapsed() > timeout {
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
        _ => {
            record(&mut st, 405);
            drop(st);
            respond(&mut conn, 405, &status(405, "MethodNotAllowed", &req.method))
        }
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
        assert!(selected(&pod, &Some("x".into()), Some(&"spec.nodeName=n1".to_string())));
        assert!(!selected(&pod, &None, Some(&"spec.nodeName=n2".to_string())));
        assert!(!selected(&pod, &Some("y".into()), None));
    }
}
