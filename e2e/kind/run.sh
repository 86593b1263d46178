#!/usr/bin/env bash
# The Kubernetes e2e suite (docs/e2e.md): the operator installed by its Helm chart, the
# OrlyRelays `minimal` (operator/examples/minimal.yaml, SQLite) and `scaled`
# (e2e/kind/orlyrelay-postgres.yaml, PostgreSQL from e2e/kind/postgres.yaml), their relay
# Services port-forwarded, and the Rust tests of e2e/tests/kind.rs run against them. The
# cluster is a kind cluster this script creates, or any cluster a kubeconfig names.
#
# Needs: kubectl, helm, cargo; for a kind cluster also kind and docker (or podman).
#   bash e2e/kind/run.sh            run the suite
#   bash e2e/kind/run.sh --plan     print what it would do with this environment, and exit
# Env:
#   ORLY_E2E_KUBECONFIG=PATH   use the cluster of this kubeconfig instead of creating a kind
#                              cluster; it is never deleted (only what the suite made is)
#   ORLY_E2E_CONTEXT           the context of ORLY_E2E_KUBECONFIG (default: its current one)
#   ORLY_E2E_REGISTRY=PREFIX   the cluster pulls <PREFIX>/<binary>:<tag>; nothing is built
#                              or loaded. ORLY_E2E_PUSH=1 builds missing local images and
#                              pushes them there first
#   ORLY_E2E_LOAD_IMAGES=CMD   load each image with `CMD <image>` (for example
#                              `minikube image load`, `k3d image import -c dev`, or `true`
#                              when the nodes have them already). Default on kind: kind load
#   KEEP_CLUSTER=1             keep the cluster, release and namespace afterwards
#   CLUSTER_NAME               kind cluster name (default orly-e2e)
#   IMAGE_REPOSITORY, IMAGE_TAG  local images (default localhost/orly-relay, the workspace
#                              version); built with scripts/build-images.sh (podman) or
#                              `docker build -f images/Dockerfile` when missing
#   ORLY_E2E_POSTGRES=0        skip PostgreSQL and the `scaled` relay
#   ORLY_E2E_NAMESPACE         namespace of the relays (default orly-e2e)
#   ORLY_E2E_OPERATOR_NAMESPACE, ORLY_E2E_RELEASE  the operator's Helm release (default
#                              orly-system, orly-operator)
#   extra arguments go to the test binary, e.g. `bash e2e/kind/run.sh --nocapture`
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

plan_only=0
if [[ ${1:-} == --plan ]]; then
  plan_only=1
  shift
fi

cluster=${CLUSTER_NAME:-orly-e2e}
ns=${ORLY_E2E_NAMESPACE:-orly-e2e}
operator_ns=${ORLY_E2E_OPERATOR_NAMESPACE:-orly-system}
release=${ORLY_E2E_RELEASE:-orly-operator}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
local_repository=${IMAGE_REPOSITORY:-localhost/orly-relay}
tag=${IMAGE_TAG:-$version}
postgres=${ORLY_E2E_POSTGRES:-1}
images=(orly orly-db orly-acl orly-sync-negentropy orly-operator)

say() { printf '==> %s\n' "$*"; }
die() { printf 'run.sh: %s\n' "$*" >&2; exit 2; }

# --- what to do: which cluster, where the images come from ------------------------------------
if [[ -n ${ORLY_E2E_KUBECONFIG:-} ]]; then
  mode=existing
else
  mode=kind
fi
if [[ -n ${ORLY_E2E_REGISTRY:-} ]]; then
  repository=${ORLY_E2E_REGISTRY%/}
  images_from=registry
elif [[ -n ${ORLY_E2E_LOAD_IMAGES:-} ]]; then
  repository=$local_repository
  images_from=hook
elif [[ $mode == kind ]]; then
  repository=$local_repository
  images_from=kind
else
  die "ORLY_E2E_KUBECONFIG names a cluster, but not how it gets the images: set ORLY_E2E_REGISTRY (it pulls them) or ORLY_E2E_LOAD_IMAGES (a command run per image; \`true\` when the nodes have them)"
fi
# A cluster of its own may run the operator for every namespace; on someone else's cluster it
# watches only the suite's namespace (namespaced RBAC, no effect on other OrlyRelays).
watch_all=$([[ $mode == kind ]] && echo 1 || echo 0)
engine=docker
command -v docker >/dev/null 2>&1 || engine=podman
build_locally=$([[ $images_from != registry || ${ORLY_E2E_PUSH:-0} == 1 ]] && echo 1 || echo 0)

relays=(minimal)
[[ $postgres == 1 ]] && relays+=(scaled)

if ((plan_only)); then
  if [[ $mode == kind ]]; then
    echo "cluster: kind $cluster (created when missing; deleted afterwards unless KEEP_CLUSTER=1)"
  else
    echo "cluster: existing, kubeconfig $ORLY_E2E_KUBECONFIG, context ${ORLY_E2E_CONTEXT:-(current)} (never deleted)"
  fi
  for image in "${images[@]}"; do echo "image: $repository/$image:$tag"; done
  case $images_from in
    registry)
      if [[ ${ORLY_E2E_PUSH:-0} == 1 ]]; then
        echo "images: pushed from $local_repository to $repository, pulled by the cluster"
      else
        echo "images: pulled by the cluster from $repository (not built, not loaded)"
      fi
      ;;
    hook) echo "images: loaded with: $ORLY_E2E_LOAD_IMAGES <image>" ;;
    kind) echo "images: loaded with kind load ($engine)" ;;
  esac
  ((build_locally)) && echo "images: built with $engine when missing"
  if ((watch_all)); then
    echo "operator: release $release in $operator_ns, watching all namespaces"
  else
    echo "operator: release $release in $operator_ns, watching namespace $ns only"
  fi
  echo "relays: ${relays[*]} in $ns"
  exit 0
fi

for tool in kubectl helm cargo; do
  command -v "$tool" >/dev/null || die "needs $tool on PATH"
done
[[ $mode == kind ]] && { command -v kind >/dev/null || die "needs kind on PATH"; }
if [[ $engine == podman && $mode == kind ]]; then
  export KIND_EXPERIMENTAL_PROVIDER=${KIND_EXPERIMENTAL_PROVIDER:-podman}
fi

# --- images: present locally, else built; pushed or loaded below -------------------------------
if ((build_locally)); then
  missing=()
  for image in "${images[@]}"; do
    "$engine" image inspect "$local_repository/$image:$tag" >/dev/null 2>&1 || missing+=("$image")
  done
  if ((${#missing[@]})); then
    if [[ $engine == docker ]]; then
      for image in "${missing[@]}"; do
        say "docker build --target $image -t $local_repository/$image:$tag"
        docker build -f images/Dockerfile --target "$image" --build-arg VERSION="$tag" \
          --build-arg REVISION="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
          -t "$local_repository/$image:$tag" .
      done
    else
      IMAGE_REPOSITORY=$local_repository bash scripts/build-images.sh "${missing[@]}"
    fi
  fi
fi
if [[ $images_from == registry && ${ORLY_E2E_PUSH:-0} == 1 ]]; then
  for image in "${images[@]}"; do
    say "pushing $repository/$image:$tag"
    "$engine" tag "$local_repository/$image:$tag" "$repository/$image:$tag"
    "$engine" push "$repository/$image:$tag"
  done
fi

# --- cluster -----------------------------------------------------------------------------------
work=$(mktemp -d)
pf_pids=()
created_ns=0
cleanup() {
  local status=$?
  for pid in "${pf_pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  if ((status != 0)); then
    say "failure: state of namespace $ns"
    kubectl -n "$ns" get orlyrelay,deploy,statefulset,hpa,networkpolicy,pods -o wide 2>&1 || true
    kubectl -n "$operator_ns" logs -l "app.kubernetes.io/instance=$release" --tail=50 2>&1 || true
  fi
  if [[ ${KEEP_CLUSTER:-0} == 1 ]]; then
    say "KEEP_CLUSTER=1: everything kept"
  elif [[ $mode == kind ]]; then
    say "deleting cluster $cluster"
    kind delete cluster --name "$cluster" || true
  else
    # Only what the suite made; the CRD stays, as Helm leaves CRDs.
    say "removing the suite's relays, release and namespace from the cluster"
    kubectl -n "$ns" delete orlyrelay --all --wait=true --timeout=2m 2>&1 || true
    helm uninstall "$release" -n "$operator_ns" 2>&1 || true
    if ((created_ns)); then kubectl delete namespace "$ns" --wait=false 2>&1 || true; fi
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT

start=$SECONDS
if [[ $mode == kind ]]; then
  if kind get clusters 2>/dev/null | grep -qx "$cluster"; then
    say "reusing kind cluster $cluster"
  else
    say "kind create cluster --name $cluster"
    kind create cluster --name "$cluster" --wait 120s
  fi
  kind get kubeconfig --name "$cluster" >"$work/kubeconfig"
else
  # A copy holding only the chosen context, so the user's kubeconfig is never changed.
  KUBECONFIG=$ORLY_E2E_KUBECONFIG kubectl config view --raw --minify --flatten \
    ${ORLY_E2E_CONTEXT:+--context="$ORLY_E2E_CONTEXT"} >"$work/kubeconfig"
fi
export KUBECONFIG=$work/kubeconfig
say "cluster: $(kubectl config current-context) at $(kubectl config view -o jsonpath='{.clusters[0].cluster.server}')"

for image in "${images[@]}"; do
  ref="$repository/$image:$tag"
  case $images_from in
    kind)
      say "loading $ref into kind"
      if [[ $engine == docker ]]; then
        kind load docker-image --name "$cluster" "$ref"
      else
        podman save -o "$work/image.tar" "$ref"
        kind load image-archive --name "$cluster" "$work/image.tar"
        rm -f "$work/image.tar"
      fi
      ;;
    hook)
      say "loading $ref: $ORLY_E2E_LOAD_IMAGES $ref"
      bash -c "$ORLY_E2E_LOAD_IMAGES \"\$1\"" load-image "$ref"
      ;;
    registry) ;;
  esac
done

# --- operator ------------------------------------------------------------------------------------
if ! kubectl get namespace "$ns" >/dev/null 2>&1; then
  kubectl create namespace "$ns"
  created_ns=1
fi
# Helm installs a CRD only when it is missing; a cluster may hold an older one.
kubectl apply --server-side --force-conflicts -f crds/orlyrelay.yaml
kubectl wait crd/orlyrelays.orly.dev --for=condition=Established --timeout=1m
scope=()
((watch_all)) || scope=(--set "watchNamespaces={$ns}")
say "helm install $release charts/orly-operator -n $operator_ns"
helm upgrade --install "$release" charts/orly-operator -n "$operator_ns" --create-namespace \
  --set image.repository="$repository/orly-operator" --set image.tag="$tag" \
  --set image.pullPolicy=IfNotPresent \
  --set operands.repository="$repository" --set operands.tag="$tag" \
  "${scope[@]}" --wait --timeout 5m
for deployment in $(kubectl -n "$operator_ns" get deploy -l "app.kubernetes.io/instance=$release" -o name); do
  kubectl -n "$operator_ns" rollout status "$deployment" --timeout=5m
done

# --- relays --------------------------------------------------------------------------------------
kubectl -n "$ns" apply -f operator/examples/minimal.yaml
if [[ $postgres == 1 ]]; then
  kubectl -n "$ns" apply -f "$here/postgres.yaml"
  kubectl -n "$ns" rollout status deploy/postgres --timeout=5m
  kubectl -n "$ns" apply -f "$here/orlyrelay-postgres.yaml"
fi
for relay in "${relays[@]}"; do
  say "waiting for orlyrelay/$relay Ready"
  kubectl -n "$ns" wait "orlyrelay/$relay" --for=condition=Ready --timeout=10m
done
kubectl -n "$ns" get orlyrelay,deploy,statefulset,hpa,svc,networkpolicy
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
say "e2e passed: tests $((SECONDS - suite)) s, total $((SECONDS - start)) s"
