#!/usr/bin/env bash
# Builds the orly container images on this machine (no Docker engine, no image registry) and
# smoke-tests each one:
#   1. sets up podman and the base image localhost/debian:bookworm-slim
#      (../shared/tools/containers base-image),
#   2. builds the two binaries on the host with the dist profile (thin LTO): orly, which is
#      every service (each image's entrypoint is the link to it named after ORLY's binary), and
#      orly-operator (cargo, CARGO_TARGET_DIR),
#   3. builds one image per service from images/Dockerfile with BINARIES=prebuilt, tagged
#      localhost/orly-relay/<binary>:<version>,
#   4. runs each image: it must run as uid 65532 and answer its health check (gRPC
#      grpc.health.v1 on the named service for the gRPC services, NIP-11 for the relay and for
#      a launcher-run stack, --help and /healthz for the operator, --help for the launcher),
#   5. prints each image's size.
# Where a registry is reachable, `docker build -f images/Dockerfile --target <binary> .` builds
# the same images from source instead (docs/images.md).
#
# Usage: bash scripts/build-images.sh [binary...]     (default: every binary of the workspace)
#   CARGO_TARGET_DIR   cargo's target dir (default: ~/.cache/orly-target)
#   SKIP_CARGO=1       use the binaries already in $CARGO_TARGET_DIR/dist
#   IMAGE_REPOSITORY   image name prefix (default: localhost/orly-relay)
# Exits non-zero when a build or a smoke test fails.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
shared_tools=$here/../../shared/tools
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/orly-target}
repository=${IMAGE_REPOSITORY:-localhost/orly-relay}

# The images, in build order, each with the Cargo package and binary it comes from: every
# service is the orly binary of package orly.
all_images=(orly orly-db orly-acl orly-sync-negentropy orly-sync-distributed orly-sync-cluster
  orly-sync-relaygroup orly-launcher orly-operator)
declare -A package=(
  [orly]=orly [orly-db]=orly [orly-acl]=orly [orly-sync-negentropy]=orly
  [orly-sync-distributed]=orly [orly-sync-cluster]=orly [orly-sync-relaygroup]=orly
  [orly-launcher]=orly [orly-operator]=orly-operator
)
binary_of() { [[ $1 == orly-operator ]] && echo orly-operator || echo orly; }

say() { printf '==> %s\n' "$*"; }
results=()
failures=0
result() { results+=("$(printf '%-5s %-22s %s' "$1" "$2" "$3")"); [[ $1 == ok ]] || failures=$((failures + 1)); }

# --- which images: the asked ones, else those whose package is in the workspace ------------------
cd "$root"
members=$(cargo metadata --format-version 1 --no-deps --locked |
  python3 -c 'import json,sys; print(" ".join(p["name"] for p in json.load(sys.stdin)["packages"]))')
images=()
for image in "${@:-${all_images[@]}}"; do
  [[ -n ${package[$image]:-} ]] || { echo "unknown image $image (known: ${all_images[*]})" >&2; exit 2; }
  if [[ " $members " == *" ${package[$image]} "* ]]; then
    images+=("$image")
  else
    say "skipping $image: package ${package[$image]} is not in the workspace yet"
  fi
done
version=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml","rb"))["workspace"]["package"]["version"])')
revision=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -z $(git status --porcelain 2>/dev/null | head -n1) ]] || revision="$revision-dirty"

# --- 1. podman and the base image ------------------------------------------------------------
say "setting up podman and the base image"
base=$(bash "$shared_tools/containers" base-image | tail -n1)
say "base image: $base ($(podman image inspect --format '{{.Size}}' "$base" | awk '{printf "%.1f MB", $1/1e6}'))"

# --- 2. the binaries on the host (profile dist: thin LTO, what the images ship) ---------------------
if [[ ${SKIP_CARGO:-0} != 1 ]]; then
  args=()
  for image in "${images[@]}"; do
    # Most images share one binary: name each once.
    bin=$(binary_of "$image")
    [[ " ${args[*]} " == *" --bin $bin "* ]] || args+=(-p "${package[$image]}" --bin "$bin")
  done
  say "cargo build --profile dist --locked ${args[*]} (CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
  start=$SECONDS
  cargo build --profile dist --locked "${args[@]}"
  say "dist build took $((SECONDS - start)) s"
fi

# --- 3. images -----------------------------------------------------------------------------------
ctx=$(mktemp -d)
containers=()
cleanup() {
  for c in "${containers[@]}"; do podman rm -f -t 2 "$c" >/dev/null 2>&1 || true; done
  rm -rf "$ctx"
}
trap cleanup EXIT

# The build context: services/orly (every service image; the Dockerfile adds the links) and
# operator/orly-operator.
mkdir -p "$ctx/services" "$ctx/operator"
for b in orly orly-operator; do
  if [[ -x $CARGO_TARGET_DIR/dist/$b ]]; then
    dir=services
    [[ $b != orly-operator ]] || dir=operator
    cp "$CARGO_TARGET_DIR/dist/$b" "$ctx/$dir/"
  fi
done

built=()
for image in "${images[@]}"; do
  dir=services
  [[ $image != orly-operator ]] || dir=operator
  bin=$(binary_of "$image")
  if [[ ! -x $ctx/$dir/$bin ]]; then
    result FAIL "$image" "no binary $CARGO_TARGET_DIR/dist/$bin"
    continue
  fi
  tag=$repository/$image:$version
  say "podman build --target $image -t $tag"
  if podman build --quiet -f "$root/images/Dockerfile" \
    --build-arg BINARIES=prebuilt --build-arg RUNTIME_IMAGE="$base" \
    --build-arg VERSION="$version" --build-arg REVISION="$revision" \
    --target "$image" -t "$tag" "$ctx" >/dev/null; then
    built+=("$image")
  else
    result FAIL "$image" "podman build failed"
  fi
done

# --- 4. smoke tests -------------------------------------------------------------------------------
# A gRPC health client (grpcio-health-checking from PyPI), cached in a venv.
venv=${XDG_CACHE_HOME:-$HOME/.cache}/orly-images-venv
requirements="grpcio-health-checking==1.85.1"
if [[ ! -x $venv/bin/python || "$(cat "$venv/.orly-requirements" 2>/dev/null)" != "$requirements" ]]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "$requirements" >&2
  echo "$requirements" >"$venv/.orly-requirements"
fi

# grpc_health ADDR SERVICE: waits up to 20 s for SERVING; prints the last status.
grpc_health() {
  "$venv/bin/python" - "$1" "$2" <<'PY'
import sys, time
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

addr, service = sys.argv[1], sys.argv[2]
status, deadline = "no answer", time.monotonic() + 20
while time.monotonic() < deadline:
    try:
        with grpc.insecure_channel(addr) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=2)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        if status == "SERVING":
            break
    except grpc.RpcError as e:
        status = f"{e.code().name}: {e.details()}"
    time.sleep(0.5)
print(status)
sys.exit(0 if status == "SERVING" else 1)
PY
}

# nip11 URL: waits up to 20 s for a NIP-11 document; prints its name and software.
nip11() {
  local doc=""
  for _ in $(seq 40); do
    if doc=$(curl -fsS --max-time 2 -H 'Accept: application/nostr+json' "$1" 2>/dev/null) && [[ -n $doc ]]; then
      python3 - "$doc" <<'PY'
import json, sys
d = json.loads(sys.argv[1])
print(f"NIP-11 name={d.get('name')!r} software={d.get('software')!r} nips={d.get('supported_nips')}")
PY
      return
    fi
    sleep 0.5
  done
  echo "no NIP-11 document at $1"
  return 1
}

# run_service IMAGE PORT [ENV=VALUE | -v VOLUME]...: starts a container, publishing PORT on a
# free loopback port; sets $cid and $hostport.
run_service() {
  local image=$1 port=$2
  shift 2
  local envs=()
  while (($#)); do
    case $1 in
      -v) envs+=(-v "$2"); shift 2 ;;
      *) envs+=(-e "$1"); shift ;;
    esac
  done
  cid=$(podman run -d --name "orly-smoke-$image-$$" "${envs[@]}" -p "127.0.0.1::$port" \
    "$repository/$image:$version") || return 1
  containers+=("$cid")
  hostport=$(podman port "$cid" "$port/tcp" | head -n1)
  [[ -n $hostport ]]
}

# uid_of IMAGE: the uid the image's processes run as (its USER, and `id -u` inside).
uid_of() {
  local user uid
  user=$(podman image inspect --format '{{.Config.User}}' "$repository/$1:$version")
  uid=$(podman run --rm --entrypoint /usr/bin/id "$repository/$1:$version" -u)
  echo "USER=$user id -u=$uid"
  [[ $uid == 65532 ]]
}

# http_codes BASE PATH...: waits up to 20 s for BASE to answer, then prints each PATH's status.
http_codes() {
  local base=$1 _
  shift
  for _ in $(seq 40); do
    curl -s --max-time 2 -o /dev/null "$base/" 2>/dev/null && break
    sleep 0.5
  done
  local codes=() p
  for p in "$@"; do codes+=("$(curl -s --max-time 2 -o /dev/null -w '%{http_code}' "$base$p")"); done
  echo "${codes[*]}"
}

# alive CONTAINER: still running after its health check.
alive() { [[ $(podman inspect --format '{{.State.Running}}' "$1") == true ]]; }

smoke() {
  local image=$1 detail uid health codes
  if ! uid=$(uid_of "$image"); then
    result FAIL "$image" "runs as root or another uid: $uid"
    return
  fi
  case $image in
    orly)
      run_service orly 3334 &&
        health=$(nip11 "http://$hostport/") && alive "$cid" &&
        detail="$health; /readyz $(curl -fsS --max-time 2 -o /dev/null -w '%{http_code}' "http://$hostport/readyz")"
      ;;
    orly-db)
      run_service orly-db 50051 &&
        health=$(grpc_health "$hostport" orlydb.v1.DatabaseService) && alive "$cid" &&
        detail="gRPC health orlydb.v1.DatabaseService: $health"
      ;;
    orly-acl)
      # Standalone on its own SQLite store (in a cluster it reaches orly-db over gRPC).
      run_service orly-acl 50052 ORLY_ACL_DB_TYPE=sqlite &&
        health=$(grpc_health "$hostport" orlyacl.v1.ACLService) && alive "$cid" &&
        detail="gRPC health orlyacl.v1.ACLService: $health"
      ;;
    orly-sync-negentropy)
      run_service orly-sync-negentropy 50064 ORLY_SYNC_NEGENTROPY_DB_TYPE=sqlite &&
        health=$(grpc_health "$hostport" orlysync.negentropy.v1.NegentropyService) && alive "$cid" &&
        detail="gRPC health orlysync.negentropy.v1.NegentropyService: $health"
      ;;
    orly-sync-distributed)
      run_service orly-sync-distributed 50061 ORLY_SYNC_DISTRIBUTED_DB_TYPE=sqlite &&
        health=$(grpc_health "$hostport" orlysync.distributed.v1.DistributedSyncService) && alive "$cid" &&
        detail="gRPC health orlysync.distributed.v1.DistributedSyncService: $health"
      ;;
    orly-sync-cluster)
      run_service orly-sync-cluster 50062 ORLY_SYNC_CLUSTER_DB_TYPE=sqlite &&
        health=$(grpc_health "$hostport" orlysync.cluster.v1.ClusterSyncService) && alive "$cid" &&
        detail="gRPC health orlysync.cluster.v1.ClusterSyncService: $health"
      ;;
    orly-sync-relaygroup)
      run_service orly-sync-relaygroup 50063 ORLY_SYNC_RELAYGROUP_DB_TYPE=sqlite &&
        health=$(grpc_health "$hostport" orlysync.relaygroup.v1.RelayGroupService) && alive "$cid" &&
        detail="gRPC health orlysync.relaygroup.v1.RelayGroupService: $health"
      ;;
    orly-launcher)
      # --help, then the launcher running db and the relay in one container: NIP-11 answers.
      if podman run --rm "$repository/orly-launcher:$version" --help >/dev/null; then
        run_service orly-launcher 3334 &&
          health=$(nip11 "http://$hostport/") && alive "$cid" &&
          detail="--help ok; launcher stack (db + relay): $health"
      else
        health="--help failed"
      fi
      ;;
    orly-operator)
      # --help, then a run against an API server that does not answer (leader election off):
      # the process stays up, /healthz says 200 and /readyz 503 until OrlyRelays can be listed.
      if health=$(podman run --rm "$repository/orly-operator:$version" --help | sed -n 1p); then
        printf '%s\n' 'apiVersion: v1' 'kind: Config' 'current-context: none' \
          'clusters: [{name: none, cluster: {server: "http://127.0.0.1:1"}}]' \
          'contexts: [{name: none, context: {cluster: none, user: none}}]' \
          'users: [{name: none, user: {}}]' >"$ctx/kubeconfig"
        chmod 0644 "$ctx/kubeconfig"
        run_service orly-operator 8080 KUBECONFIG=/etc/orly/kubeconfig \
          ORLY_OPERATOR_LEADER_ELECTION=false -v "$ctx/kubeconfig:/etc/orly/kubeconfig:ro" &&
          codes=$(http_codes "http://$hostport" /healthz /readyz) && [[ $codes == "200 503" ]] &&
          alive "$cid" && detail="--help ok; no API server: /healthz 200, /readyz 503"
        health="--help ok; /healthz, /readyz: ${codes:-no answer}"
      fi
      ;;
  esac
  if [[ -n ${detail:-} ]]; then
    result ok "$image" "uid 65532; $detail"
  else
    result FAIL "$image" "uid 65532; health check failed: ${health:-}"
    if [[ -n ${cid:-} ]]; then podman logs --tail 20 "$cid" 2>&1 | sed "s/^/      $image: /" >&2; fi
  fi
}

for image in "${built[@]}"; do
  say "smoke test $image"
  cid="" hostport="" detail=""
  smoke "$image"
  if [[ -n $cid ]]; then podman rm -f -t 2 "$cid" >/dev/null 2>&1 || true; fi
done

# --- 5. report -------------------------------------------------------------------------------------
echo
say "images ($repository/*:$version)"
for image in "${built[@]}"; do
  podman image inspect --format '{{.Size}}' "$repository/$image:$version" |
    awk -v i="$repository/$image:$version" '{printf "    %-50s %7.1f MB\n", i, $1/1e6}'
done
echo
say "smoke tests"
printf '    %s\n' "${results[@]}"
if ((failures)); then
  echo "build-images: $failures failure(s)"
  exit 1
fi
echo "build-images: all ${#built[@]} images built and smoke-tested"
