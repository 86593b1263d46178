#!/usr/bin/env bash
# Checks that `cargo run --release -p orly` can reuse what `cargo build --release --workspace
# --bins` built: every crate of the relay's build must come with the same features in both.
# Cargo builds a crate once per feature set, so one differing crate rebuilds it and everything
# above it. Compares cargo's unit graphs (nothing is compiled; RUSTC_BOOTSTRAP=1 unlocks
# `--unit-graph` on a stable toolchain) and names each crate that differs, with the features
# to add to the alignment block of services/relay/Cargo.toml. See docs/build-time.md.
#
# Usage: bash scripts/check-build-features.sh [--profile release]   (exit 1 on a difference)
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${2:-release}
[[ ${1:-} == --profile || -z ${1:-} ]] || { echo "usage: $0 [--profile NAME]" >&2; exit 2; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
graph() { RUSTC_BOOTSTRAP=1 cargo build --profile "$profile" --locked --unit-graph -Z unstable-options "$@"; }
graph --workspace --bins >"$tmp/workspace.json"
graph -p orly --bin orly >"$tmp/orly.json"
python3 - "$tmp/workspace.json" "$tmp/orly.json" <<'PY'
import json, sys

def units(path):
    out = {}
    for u in json.load(open(path))["units"]:
        # The profile and platform belong to the key: a build dependency (host, opt-level 0)
        # and the same crate as a normal dependency (target, release) are different units.
        profile = json.dumps(u.get("profile", {}), sort_keys=True)
        key = (u["pkg_id"], u["target"]["name"], u["mode"], tuple(u["target"]["kind"]),
               profile, u.get("platform"))
        out.setdefault(key, []).append(set(u["features"]))
    return out

workspace, relay = units(sys.argv[1]), units(sys.argv[2])
bad = []
for key, variants in relay.items():
    for feats in variants:
        theirs = workspace.get(key, [])
        if feats not in theirs:
            extra = sorted(set().union(*theirs) - feats) if theirs else ["(not built)"]
            bad.append((key[0].split("#")[-1], key[2], extra))
if not bad:
    print(f"build features: the relay's {sum(map(len, relay.values()))} units are all in the workspace build")
    sys.exit(0)
print("build features: these crates are built with other features by the workspace build, so")
print("`cargo run --release -p orly` would build them (and what depends on them) again; add the")
print("features to the alignment block of services/relay/Cargo.toml:")
for pkg, mode, extra in sorted(set((p, m, tuple(e)) for p, m, e in bad)):
    print(f"  {pkg} ({mode}): {', '.join(extra)}")
sys.exit(1)
PY
