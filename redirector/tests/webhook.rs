//! `redirector webhook`: every pod of the meshes' own injector goldens
//! through the webhook's answer and the API server's handling of it
//! (`redirector_testkit::admission`), and the shipped binary over HTTPS on
//! loopback with a certificate made here (Debian's `openssl req`), rotated
//! while it runs.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use redirector_policy::k8s::{
    admission::{self, Settings, GATE_NAME},
    injector::{
        decide,
        gated::{policy_json, INJECTED_INIT, POLICY},
        Decision,
    },
    pods::{pod_objects_from_manifests, PodInfo},
};
use redirector_testkit::admission::{apply_response, pod_create_review};
use serde_json::Value;

fn upstream_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../redirector-policy/tests/fixtures/upstream")
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml" || x == "injected") {
            out.push(p);
        }
    }
    out.sort();
    out
}

fn settings() -> Settings {
    Settings {
        preset: None,
        rules: Vec::new(),
        gate_image: "registry.example/redirector:1".into(),
        socket_dir: "/var/run/redirector".into(),
    }
}

/// The pod as the agent will see it (the UID the API server gives it
/// after admission).
fn info(pod: &Value) -> PodInfo {
    let mut p = pod.clone();
    p["metadata"]["uid"] = "after-admission".into();
    PodInfo::from_pod(&serde_json::from_value(p).unwrap()).unwrap()
}

fn policy_of(d: &Decision) -> Option<Value> {
    match d {
        Decision::Injected { reading, .. } => {
            Some(policy_json(&redirector_policy::compile(&reading.mesh, &reading.annotations)))
        }
        _ => None,
    }
}

/// Capabilities the regular init containers add.
fn init_caps(pod: &Value) -> Vec<String> {
    pod["spec"]["initContainers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["restartPolicy"] != "Always")
        .flat_map(|c| c["securityContext"]["capabilities"]["add"].as_array().cloned().unwrap_or_default())
        .filter_map(|c| c.as_str().map(String::from))
        .collect()
}

/// Every pod of the corpus: the answer is one the API server accepts and
/// applies; a switched pod parses as a Pod, decides (as the agent will)
/// to the same policy through the gate, and has no iptables init
/// container and no NET_ADMIN left in its init containers; every other
/// pod comes back unchanged, refused ones with a warning.
#[test]
fn the_meshes_own_injector_goldens_through_the_webhook() {
    let mut switched: BTreeMap<String, usize> = BTreeMap::new();
    let (mut unchanged, mut warned) = (0, 0);
    for file in ["istio", "linkerd", "kuma"].iter().flat_map(|m| walk(&upstream_dir().join(m))) {
        let name = file.strip_prefix(upstream_dir()).unwrap().display().to_string();
        let text = std::fs::read_to_string(&file).unwrap();
        for (i, (_, pod)) in pod_objects_from_manifests(&text).unwrap().into_iter().enumerate() {
            let what = format!("{name}#{i}");
            let uid = format!("uid-{i}");
            let ns = pod["metadata"]["namespace"].as_str().unwrap().to_string();
            let body = serde_json::to_vec(&pod_create_review(&uid, &ns, &pod)).unwrap();
            let (response, outcome) = admission::review(&body, &settings()).unwrap_or_else(|e| panic!("{what}: {e:#}"));
            let applied = apply_response(&uid, &pod, response.to_string().as_bytes())
                .unwrap_or_else(|e| panic!("{what}: the API server refuses the answer: {e:#}"));
            assert!(applied.allowed, "{what}: never denied");
            let before = decide(&info(&pod), &[]);
            match outcome {
                admission::Outcome::Switched { replaced, tool, .. } => {
                    assert!(applied.patched && applied.warnings.is_empty(), "{what}");
                    let after = decide(&info(&applied.object), &[]);
                    match &after {
                        Decision::Injected { container, gate: Some(g), .. } => {
                            assert_eq!((container, g.as_str()), (&replaced, GATE_NAME), "{what}")
                        }
                        other => panic!("{what}: the switched pod decides as {other:?}"),
                    }
                    assert_eq!(policy_of(&after), policy_of(&before), "{what}: the same policy");
                    let ann = &applied.object["metadata"]["annotations"];
                    let recorded: Value = serde_json::from_str(ann[POLICY].as_str().unwrap()).unwrap();
                    assert_eq!(Some(recorded), policy_of(&before), "{what}: the recorded policy");
                    assert!(ann[INJECTED_INIT].as_str().unwrap().contains(&replaced), "{what}");
                    let inits: Vec<&str> = applied.object["spec"]["initContainers"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|c| c["name"].as_str().unwrap())
                        .collect();
                    assert!(!inits.contains(&replaced.as_str()) && inits.contains(&GATE_NAME), "{what}: {inits:?}");
                    assert!(!init_caps(&pod).is_empty(), "{what}: {replaced} had capabilities");
                    assert!(init_caps(&applied.object).is_empty(), "{what}: {:?}", init_caps(&applied.object));
                    *switched.entry(tool.to_string()).or_default() += 1;
                }
                other => {
                    assert!(!applied.patched && applied.object == pod, "{what}: {other:?}");
                    let refused = matches!(before, Decision::Refused { .. });
                    assert_eq!(!applied.warnings.is_empty(), refused, "{what}: {other:?} {:?}", applied.warnings);
                    assert!(!matches!(other, admission::Outcome::Failed { .. }), "{what}: {other:?}");
                    unchanged += 1;
                    warned += usize::from(refused);
                }
            }
        }
    }
    eprintln!("switched {switched:?}; unchanged {unchanged}, of which {warned} refused with a warning");
    for tool in ["istio-iptables", "linkerd2-proxy-init", "kumactl"] {
        assert!(switched.get(tool).copied().unwrap_or(0) >= 5, "{tool}: {switched:?}");
    }
    assert!(warned >= 5 && unchanged > warned, "{unchanged} {warned}");
}

fn openssl(args: &[&str], paths: &[&Path]) {
    let out = Command::new("openssl").args(args).args(paths).output().expect("openssl (Debian's openssl package) runs");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A CA (as the Issuer's, whose certificate is the webhook
/// configuration's caBundle): its certificate and key.
fn make_ca(dir: &Path) -> (PathBuf, PathBuf) {
    let (crt, key) = (dir.join("ca.crt"), dir.join("ca.key"));
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=redirector-webhook-ca",
            "-keyout",
        ],
        &[&key, Path::new("-out"), &crt],
    );
    (crt, key)
}

/// A serving certificate for `localhost` and 127.0.0.1 signed by the CA,
/// as cert-manager issues (and re-issues) it: its certificate and key.
fn make_leaf(dir: &Path, name: &str, ca: &(PathBuf, PathBuf)) -> (PathBuf, PathBuf) {
    let (crt, key, csr, ext) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
        dir.join(format!("{name}.csr")),
        dir.join(format!("{name}.ext")),
    );
    std::fs::write(
        &ext,
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n\
         subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=redirector-webhook",
            "-keyout",
        ],
        &[&key, Path::new("-out"), &csr],
    );
    openssl(
        &["x509", "-req", "-days", "1", "-CAcreateserial", "-in"],
        &[
            &csr,
            Path::new("-CA"),
            &ca.0,
            Path::new("-CAkey"),
            &ca.1,
            Path::new("-extfile"),
            &ext,
            Path::new("-out"),
            &crt,
        ],
    );
    (crt, key)
}

/// Replaces `to` by `from` in one rename, as the kubelet swaps a Secret
/// volume's files.
fn swap(from: &Path, to: &Path) {
    let tmp = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

struct Webhook {
    child: Child,
    addr: String,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Webhook {
    fn start(cert: &Path, key: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_redirector"))
            .args(["webhook", "--listen", "127.0.0.1:0", "--gate-image", "registry.example/redirector:1"])
            .arg("--tls-cert-file")
            .arg(cert)
            .arg("--tls-key-file")
            .arg(key)
            .env("RUST_LOG", "info")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let l = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("on https://").nth(1) {
                    let _ = tx.send(rest.split('/').next().unwrap_or("").to_string());
                }
                l.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no address: {:?}", log.lock().unwrap()));
        Webhook { child, addr, log }
    }

    fn logged(&self, what: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(what))
    }
}

/// One HTTPS request, trusting only the CA `ca` (the caBundle); the answer's status and body,
/// and the certificate the server presented.
async fn request(
    addr: &str,
    ca: &Path,
    method: &str,
    path: &str,
    ctype: &str,
    body: Vec<u8>,
) -> (u16, Vec<u8>, Vec<u8>) {
    use http_body_util::{BodyExt as _, Full};
    use rustls::pki_types::{pem::PemObject as _, CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(ca).unwrap()).unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap_or_else(|e| panic!("TLS handshake with {addr}: {e}"));
    let presented = tls.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (mut send, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost")
        .header("content-type", ctype)
        .body(Full::new(bytes::Bytes::from(body)))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.into_body().collect().await.unwrap().to_bytes().to_vec(), presented)
}

fn der(pem: &Path) -> Vec<u8> {
    use rustls::pki_types::{pem::PemObject as _, CertificateDer};
    CertificateDer::from_pem_file(pem).unwrap().to_vec()
}

fn pod(file: &str) -> Value {
    let text = std::fs::read_to_string(upstream_dir().join(file)).unwrap();
    let mut p = pod_objects_from_manifests(&text).unwrap().remove(0).1;
    // As a ReplicaSet's pod is admitted: no name, no UID yet.
    let m = p["metadata"].as_object_mut().unwrap();
    m.remove("uid");
    let name = m.remove("name").unwrap();
    m.insert("generateName".into(), format!("{}-", name.as_str().unwrap()).into());
    p
}

#[test]
fn https_answers_as_the_api_server_checks_them_and_the_certificate_rotates() {
    let dir = std::env::temp_dir().join(format!("redirector-webhook-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca = make_ca(&dir);
    let (crt_a, key_a) = make_leaf(&dir, "a", &ca);
    let (crt_b, key_b) = make_leaf(&dir, "b", &ca);
    let (crt, key) = (dir.join("tls.crt"), dir.join("tls.key"));
    swap(&crt_a, &crt);
    swap(&key_a, &key);
    let hook = Webhook::start(&crt, &key);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let (status, body, presented) = request(&hook.addr, &ca.0, "GET", "/healthz", "text/plain", vec![]).await;
        assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));
        assert_eq!(presented, der(&crt_a));

        // A meshed pod: switched, as the API server checks and applies it.
        let hello = pod("istio/pkg__kube__inject__testdata__inject__hello.yaml.injected");
        let review = pod_create_review("7f0d2b5e-0001", "shop", &hello);
        let (status, body, _) =
            request(&hook.addr, &ca.0, "POST", "/mutate", "application/json", serde_json::to_vec(&review).unwrap())
                .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        let applied = apply_response("7f0d2b5e-0001", &hello, &body).unwrap();
        assert!(applied.allowed && applied.patched);
        assert_eq!(applied.object["spec"]["initContainers"][0]["name"], GATE_NAME);
        assert!(hook.logged("shop/hello-(generated): init container istio-init (istio-iptables) replaced"));
        // `check --pod` on the pod as created: what the agent will do.
        let mut created = applied.object.clone();
        created["metadata"]["name"] = "hello-7d4b9".into();
        let file = dir.join("created.json");
        std::fs::write(&file, created.to_string()).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_redirector"))
            .args(["check", "--json", "--pod"])
            .arg(&file)
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        let p = &v["pods"][0];
        assert_eq!(
            (&p["decision"], &p["source_of_policy"], &p["gate"], &p["container"]),
            (&"programmed".into(), &"recorded-init-container".into(), &GATE_NAME.into(), &"istio-init".into()),
            "{v:#}"
        );
        assert_eq!(p["policy"]["proxy_uid"], 1337);

        // A refused pod: allowed unchanged, with a warning naming the setting.
        let tproxy = pod("istio/pkg__kube__inject__testdata__inject__hello-tproxy.yaml.injected");
        let review = pod_create_review("7f0d2b5e-0002", "shop", &tproxy);
        let (_, body, _) =
            request(&hook.addr, &ca.0, "POST", "/mutate", "application/json", serde_json::to_vec(&review).unwrap())
                .await;
        let applied = apply_response("7f0d2b5e-0002", &tproxy, &body).unwrap();
        assert!(applied.allowed && !applied.patched);
        assert!(applied.warnings[0].contains("-m \"TPROXY\""), "{:?}", applied.warnings);

        // What is not an AdmissionReview: refused at the HTTP level.
        let (status, _, _) = request(&hook.addr, &ca.0, "POST", "/mutate", "application/json", b"{}".to_vec()).await;
        assert_eq!(status, 400);
        let (status, _, _) = request(&hook.addr, &ca.0, "POST", "/mutate", "text/plain", b"{}".to_vec()).await;
        assert_eq!(status, 415);
        let (status, _, _) = request(&hook.addr, &ca.0, "GET", "/mutate", "application/json", vec![]).await;
        assert_eq!(status, 405);

        // cert-manager rotates the Secret: the new pair is served.
        swap(&key_b, &key);
        swap(&crt_b, &crt);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, _, presented) = request(&hook.addr, &ca.0, "GET", "/healthz", "text/plain", vec![]).await;
            if presented == der(&crt_b) {
                break;
            }
            assert!(Instant::now() < deadline, "still serving the old certificate: {:?}", hook.log.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // A certificate whose key is not the one beside it: the last good
        // pair stays, with a warning.
        swap(&crt_a, &crt);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !hook.logged("do not load") {
            assert!(Instant::now() < deadline, "no warning: {:?}", hook.log.lock().unwrap());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let (status, _, presented) = request(&hook.addr, &ca.0, "GET", "/healthz", "text/plain", vec![]).await;
        assert_eq!((status, presented), (200, der(&crt_b)));
    });
    // SIGTERM: a clean exit.
    let mut hook = hook;
    // SAFETY: kill(2) on the child this test started.
    assert_eq!(unsafe { libc::kill(hook.child.id() as i32, libc::SIGTERM) }, 0);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = hook.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "still running after SIGTERM");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "{status}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Without a certificate that loads, the webhook does not start.
#[test]
fn no_usable_certificate_no_start() {
    let dir = std::env::temp_dir().join(format!("redirector-webhook-nocert-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca = make_ca(&dir);
    let (crt_a, _) = make_leaf(&dir, "a", &ca);
    let (_, key_b) = make_leaf(&dir, "b", &ca);
    let out = Command::new(env!("CARGO_BIN_EXE_redirector"))
        .args(["webhook", "--listen", "127.0.0.1:0", "--gate-image", "r:1", "--tls-cert-file"])
        .arg(&crt_a)
        .arg("--tls-key-file")
        .arg(&key_b)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not a usable key of that certificate"), "{err}");
    let out = Command::new(env!("CARGO_BIN_EXE_redirector"))
        .args([
            "webhook",
            "--gate-image",
            "r:1",
            "--agent-socket-dir",
            "run/x",
            "--tls-cert-file",
            "a",
            "--tls-key-file",
            "b",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--agent-socket-dir") && err.contains("run/x"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
