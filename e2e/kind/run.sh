#!/usr/bin/env bash
# The kind e2e suite (docs/e2e.md): a kind cluster with the operator installed by its Helm
# chart, the OrlyRelays `minimal` (operator/examples/minimal.yaml, SQLite) and `scaled`
# (e2e/kind/orlyrelay-postgres.yaml, PostgreSQL from e2e/kind/postgres.yaml), their relay
# Services port-forwarded, and the Rust tests of e2e/tests/kind.rs run against them.
#
# Needs: docker (or podman, see below), kind, kubectl, helm, cargo. Run from anywhere:
#   bash e2e/kind/run.sh
# Env:
#   KEEP_CLUSTER=1             leave the cluster (and namespace) up afterwards
#   CLUSTER_NAME               default orly-e2e
#   IMAGE_REPOSITORY, IMAGE_TAG  images to load (default localhost/orly-relay, the workspace
#                              version); built with scripts/build-images.sh (podman) or
#                              `docker build -f images/Dockerfile` when missing
#   ORLY_E2E_POSTGRES=0        skip PostgreSQL and the `scaled` relay
#   ORLY_E2E_NAMESPACE         namespace of the relays (default orly-e2e)
#   extra arguments go to the test binary, e.g. `bash e2e/kind/run.sh --nocapture`
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

cluster=${CLUSTER_NAME:-orly-e2e}
ns=${ORLY_E2E_NAMESPACE:-orly-e2e}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
repository=${IMAGE_REPOSITORY:-localhost/orly-relay}
tag=${IMAGE_TAG:-$version}
postgres=${ORLY_E2E_POSTGRES:-1}
images=(orly orly-db orly-acl orly-sync-negentropy orly-operator)

say() { printf '==> %s\n' "$*"; }
for tool in kind kubectl helm cargo; do
  command -v "$tool" >/dev/null || { echo "run.sh needs $tool on PATH" >&2; exit 2; }
done

# --- images: present in docker, else podman; built when missing ---------------------------------
engine=docker
command -v docker >/dev/null 2>&1 || engine=podman
if [[ $engine == podman ]]; then export KIND_EXPERIMENTAL_PROVIDER=${KIND_EXPERIMENTAL_PROVIDER:-podman}; fi
missing=()
for image in "${images[@]}"; do
  "$engine" image inspect "$repository/$image:$tag" >/dev/null 2>&1 || missing+=("$image")
done
if ((${#missing[@]})); then
  if [[ $engine == docker ]]; then
    for image in "${missing[@]}"; do
      say "docker build --target $image -t $repository/$image:$tag"
      docker build -f images/Dockerfile --target "$image" --build-arg VERSION="$tag" \
        --build-arg REVISION="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
        -t "$repository/$image:$tag" .
    done
  else
    IMAGE_REPOSITORY=$repository bash scripts/build-images.sh "${missing[@]}"
  fi
fi

# --- cluster -----------------------------------------------------------------------------------------
pf_pids=()
cleanup() {
  local status=$?
  for pid in "${pf_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if ((status != 0)); then
    say "failure: state of namespace $ns"
    kubectl -n "$ns" get orlyrelay,deploy,statefulset,hpa,pods -o wide 2>&1 || true
    kubectl -n orly-system logs deploy/orly-operator --tail=50 2>&1 || true
  fi
  if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then
    say "KEEP_CLUSTER=1: cluster $cluster kept (kind delete cluster --name $cluster)"
  else
    say "deleting cluster $cluster"
    kind delete cluster --name "$cluster" || true
  fi
  exit "$status"
}
trap cleanup EXIT

start=$SECONDS
if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
  say "reusing kind cluster $cluster"
else
  say "kind create cluster --name $cluster"
  kind create cluster --name "$cluster" --wait 120s
fi
kubectl config use-context "kind-$cluster" >/dev/null

for image in "${images[@]}"; do
  say "loading $repository/$image:$tag into kind"
  if [[ $engine == docker ]]; then
    kind load docker-image --name "$cluster" "$repository/$image:$tag"
  else
    archive=$(mktemp --suffix=.tar)
    podman save -o "$archive" "$repository/$image:$tag"
    kind load image-archive --name "$cluster" "$archive"
    rm -f "$archive"
  fi
done

# --- operator -------------------------------------------------------------------------------------
say "helm install orly-operator charts/orly-operator -n orly-system"
helm upgrade --install orly-operator charts/orly-operator -n orly-system --create-namespace \
  --set image.repository="$repository/orly-operator" --set image.tag="$tag" \
  --set image.pullPolicy=IfNotPresent \
  --set operands.repository="$repository" --set operands.tag="$tag" \
  --wait --timeout 5m
kubectl -n orly-system rollout status deploy/orly-operator --timeout=5m

# --- relays -------------------------------------------------------------------------------------------
kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$ns" apply -f operator/examples/minimal.yaml
relays=(minimal)
if [[ $postgres == 1 ]]; then
  kubectl -n "$ns" apply -f "$here/postgres.yaml"
  kubectl -n "$ns" rollout status deploy/postgres --timeout=5m
  kubectl -n "$ns" apply -f "$here/orlyrelay-postgres.yaml"
  relays+=(scaled)
fi
for relay in "${relays[@]}"; do
  say "waiting for orlyrelay/$relay Ready"
  kubectl -n "$ns" wait "orlyrelay/$relay" --for=condition=Ready --timeout=10m
done
kubectl -n "$ns" get orlyrelay,deploy,statefulset,hpa,svc
say "cluster ready after $((SECONDS - start)) s"

# --- port-forwards: re-established whenever the pod behind one goes away ---------------------------
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
forward() { # RELAY PORT
  while true; do
    kubectl -n "$ns" port-forward "svc/$1-relay" "$2:3334" >/dev/null 2>&1 || true
    sleep 1
  done &
  pf_pids+=($!)
}
minimal_port=$(free_port)
forward minimal "$minimal_port"
export ORLY_E2E_NAMESPACE=$ns ORLY_E2E_MINIMAL_RELAY=minimal ORLY_E2E_MINIMAL_URL=ws://127.0.0.1:$minimal_port
if [[ $postgres == 1 ]]; then
  scaled_port=$(free_port)
  forward scaled "$scaled_port"
  export ORLY_E2E_SCALED_RELAY=scaled ORLY_E2E_SCALED_URL=ws://127.0.0.1:$scaled_port
else
  unset ORLY_E2E_SCALED_URL
fi
for port in "$minimal_port" ${scaled_port:+"$scaled_port"}; do
  for _ in $(seq 60); do
    curl -fsS -o /dev/null -H 'Accept: application/nostr+json' "http://127.0.0.1:$port/" && break
    sleep 1
  done
done

# --- the tests ----------------------------------------------------------------------------------------
say "cargo test -p orly-e2e --test kind -- --ignored --test-threads=1"
suite=$SECONDS
cargo test -p orly-e2e --test kind -- --ignored --test-threads=1 "$@"
say "kind e2e passed: tests $((SECONDS - suite)) s, total $((SECONDS - start)) s"
