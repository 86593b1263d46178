#!/usr/bin/env bash
# Removes what an interrupted container e2e run left behind. The tests remove their own
# containers, networks and volumes on drop, but a SIGKILLed test process cannot. Every object
# is named orly-e2e-<pid>-<millis>-…; this removes those whose test process <pid> is gone,
# so a run in progress (yours or another engineer's) is left alone.
# Usage: bash e2e/containers/cleanup.sh [--dry-run]
set -euo pipefail
dry=${1:-}
stale() { # NAME -> true when its pid no longer runs
  local pid
  pid=$(sed -n 's/^orly-e2e-\([0-9]\+\)-.*/\1/p' <<<"$1")
  [[ -n $pid ]] && ! kill -0 "$pid" 2>/dev/null
}
remove() { # KIND NAME...
  local kind=$1
  shift
  for name in "$@"; do
    stale "$name" || continue
    echo "removing $kind $name"
    [[ $dry == --dry-run ]] && continue
    case $kind in
      container) podman rm -f -t 0 "$name" >/dev/null ;;
      volume) podman volume rm -f "$name" >/dev/null ;;
      network) podman network rm -f "$name" >/dev/null ;;
    esac
  done
}
mapfile -t containers < <(podman ps -a --format '{{.Names}}' | grep '^orly-e2e-' || true)
remove container "${containers[@]}"
mapfile -t volumes < <(podman volume ls --format '{{.Name}}' | grep '^orly-e2e-' || true)
remove volume "${volumes[@]}"
mapfile -t networks < <(podman network ls --format '{{.Name}}' | grep '^orly-e2e-' || true)
remove network "${networks[@]}"
