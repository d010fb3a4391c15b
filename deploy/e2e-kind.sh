#!/usr/bin/env bash
# End-to-end on a kind cluster: build the image, install redirector, run a
# meshed pod whose init container is `redirector wait-ready`, and check
# that its outbound connection reaches a stand-in proxy on 15001 with the
# original destination.
#
# NOT RUN IN CI: it needs Docker and kind, which the project's build
# machine does not have (no Docker engine, no kube-apiserver). The same
# behaviour is covered there by the `kube_agent_*` kernel tests against a
# fake API server. Run it yourself on a machine with docker, kind and
# kubectl:   bash deploy/e2e-kind.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CLUSTER=${CLUSTER:-redirector-e2e}
IMAGE=redirector:dev

for tool in docker kind kubectl cargo; do
  command -v "$tool" >/dev/null || { echo "e2e-kind: $tool is required" >&2; exit 1; }
done

cargo xtask build
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS='-C target-feature=+crt-static' \
  cargo build --release -p redirector --target x86_64-unknown-linux-gnu
docker build -f deploy/Dockerfile -t "$IMAGE" target/x86_64-unknown-linux-gnu/release

kind get clusters | grep -qx "$CLUSTER" || kind create cluster --name "$CLUSTER"
trap 'kind delete cluster --name "$CLUSTER"' EXIT
kind load docker-image "$IMAGE" --name "$CLUSTER"

kubectl apply -k deploy/
kubectl -n redirector-system rollout status ds/redirector --timeout=120s

# A meshed pod (OSM's injector label), with the gate as its init container,
# a stand-in proxy as UID 1500 answering on 15001, and an app (UID 1000)
# that dials a documentation address: only the proxy can answer it.
kubectl apply -f - <<'YAML'
apiVersion: v1
kind: Pod
metadata:
  name: meshed
  labels: {osm-proxy-uuid: e2e}
spec:
  initContainers:
    - name: redirector-init
      image: redirector:dev
      command: [redirector, wait-ready, --agent-socket=/var/run/redirector/agent.sock, --timeout=60s]
      env: [{name: POD_UID, valueFrom: {fieldRef: {fieldPath: metadata.uid}}}]
      volumeMounts: [{name: redirector-socket, mountPath: /var/run/redirector}]
  containers:
    - name: envoy
      image: busybox:1.36
      securityContext: {runAsUser: 1500}
      command: [sh, -c, 'while true; do echo proxied | nc -l -p 15001; done']
    - name: app
      image: busybox:1.36
      securityContext: {runAsUser: 1000}
      command: [sh, -c, 'sleep 3; while true; do nc -w 2 192.0.2.10 80 </dev/null; sleep 2; done']
  volumes:
    - name: redirector-socket
      hostPath: {path: /var/run/redirector, type: Directory}
YAML
kubectl wait --for=condition=Ready pod/meshed --timeout=120s
for _ in $(seq 30); do
  if kubectl logs meshed -c app | grep -q proxied; then
    echo "e2e-kind: PASS: the app's connection to 192.0.2.10:80 reached the proxy"
    kubectl -n redirector-system exec ds/redirector -- redirector inspect --pin-dir /sys/fs/bpf/redirector || true
    exit 0
  fi
  sleep 2
done
echo "e2e-kind: FAIL: no redirected connection; agent logs:" >&2
kubectl -n redirector-system logs ds/redirector >&2
exit 1
