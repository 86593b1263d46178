#!/usr/bin/env bash
# The container e2e suite: two split-deployment stacks of the real images on private podman
# networks, driven from the host over WebSockets (e2e/tests/containers.rs, docs/e2e.md).
#
#   1. sets up podman with ../shared/tools/containers (relative to this repository) when
#      podman is missing;
#   2. builds the images with scripts/build-images.sh when any is missing
#      (localhost/orly-relay/<binary>:<version>, or $ORLY_E2E_IMAGE_REPOSITORY/…:$ORLY_E2E_IMAGE_TAG);
#   3. runs `cargo test -p orly-e2e --test containers -- --ignored --test-threads=1` and
#      prints the suite's wall time.
#
# Usage: bash e2e/run-containers.sh [extra libtest args, e.g. --nocapture]
#   ORLY_E2E_IMAGE_REPOSITORY  image prefix (default localhost/orly-relay)
#   ORLY_E2E_IMAGE_TAG         image tag (default: the workspace version)
#   CARGO_TARGET_DIR           honoured by cargo as usual
# The tests remove every container, network and volume they create (names orly-e2e-<pid>-…).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
cd "$root"

say() { printf '==> %s\n' "$*"; }

# 1. podman
if ! command -v podman >/dev/null 2>&1; then
  say "podman is missing: setting it up with ../shared/tools/containers"
  bash "$root/../shared/tools/containers"
fi

# 2. images
version=$(python3 -c 'import tomllib; print(tomllib.load(open("Cargo.toml","rb"))["workspace"]["package"]["version"])')
repository=${ORLY_E2E_IMAGE_REPOSITORY:-localhost/orly-relay}
tag=${ORLY_E2E_IMAGE_TAG:-$version}
export ORLY_E2E_IMAGE_REPOSITORY=$repository ORLY_E2E_IMAGE_TAG=$tag
missing=()
for image in orly orly-db orly-acl orly-sync-negentropy; do
  podman image exists "$repository/$image:$tag" || missing+=("$image")
done
if ((${#missing[@]})); then
  say "building the missing images: ${missing[*]}"
  IMAGE_REPOSITORY=$repository bash "$root/scripts/build-images.sh" "${missing[@]}"
fi
say "images: $repository/{orly,orly-db,orly-acl,orly-sync-negentropy}:$tag"

# 3. the suite (built first, so the wall time is the suite's own)
cargo test -p orly-e2e --test containers --no-run
say "cargo test -p orly-e2e --test containers -- --ignored --test-threads=1 $*"
start=$(date +%s.%N)
status=0
cargo test -p orly-e2e --test containers -- --ignored --test-threads=1 --nocapture "$@" || status=$?
end=$(date +%s.%N)
wall=$(python3 -c "print(f'{$end - $start:.1f}')")
if ((status == 0)); then
  say "container e2e passed; wall time ${wall} s"
else
  say "container e2e FAILED (exit $status); wall time ${wall} s"
fi
exit "$status"
