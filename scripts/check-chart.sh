#!/usr/bin/env bash
# Checks the orly-operator Helm chart: its CRD is the repo's, `helm lint` passes with the
# default values and each example values file, and everything `helm template` renders, plus
# every example OrlyRelay, validates against the Kubernetes API schemas (kubernetes-validate,
# strict) and against the OrlyRelay CRD's openAPIV3Schema (jsonschema; the Rust tests in
# operator/tests/crd_validation.rs check the CEL rules). Also checks that each RBAC rule carries a
# comment, that every child kind the controller watches is granted list and watch, and that
# the operator env the chart sets is env the binary reads.
#
# Usage (from anywhere; paths resolve from this script): bash scripts/check-chart.sh
#   CHECK_CHART_KUBE_VERSIONS="1.29 1.34"  Kubernetes versions to validate against
#                                           (default: the chart's minimum 1.29, kubectl's 1.34
#                                           and the newest kubernetes-validate knows)
# Tools: helm and kubectl from ../shared/tools/k8s-clients; a Python venv in
# ${XDG_CACHE_HOME:-~/.cache}/orly-chart-venv. Both are cached, so a second run takes seconds.
# Prints one line per check ("ok" or "FAIL", with details indented) and exits 1 when any fails.
set -euo pipefail
shopt -s nullglob

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
chart=$root/charts/orly-operator
# Beside the clone (../shared/tools); ORLY_SHARED_TOOLS names them elsewhere (a clone in /tmp).
shared_tools=${ORLY_SHARED_TOOLS:-$here/../../shared/tools}
[ -d "$shared_tools" ] || shared_tools=/work/shared/tools

failures=0
ok() { printf 'ok    %s\n' "$*"; }
fail() { printf 'FAIL  %s\n' "$*"; failures=$((failures + 1)); }

# --- tools ---------------------------------------------------------------------------------
clients=$(bash "$shared_tools/k8s-clients")
PATH="$clients:$PATH"
venv=${XDG_CACHE_HOME:-$HOME/.cache}/orly-chart-venv
requirements="kubernetes-validate==1.37.0 jsonschema==4.26.0 PyYAML==6.0.4"
if [[ ! -x $venv/bin/python || "$(cat "$venv/.orly-requirements" 2>/dev/null)" != "$requirements" ]]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086 # word splitting of the requirement list is intended
  "$venv/bin/pip" install --quiet --disable-pip-version-check $requirements >&2
  echo "$requirements" >"$venv/.orly-requirements"
fi
ok "tools: $(helm version --template 'helm {{.Version}}'), kubectl $(kubectl version --client -o json | "$venv/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["clientVersion"]["gitVersion"])'), $("$venv/bin/python" -c 'import kubernetes_validate.utils as u, kubernetes_validate.version as v; print(f"kubernetes-validate {v.__version__} (Kubernetes {u.all_versions()[0]} to {u.latest_version()})")')"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# --- the chart's CRD is the repo's ---------------------------------------------------------
if cmp -s "$root/crds/orlyrelay.yaml" "$chart/crds/orlyrelay.yaml"; then
  ok "chart CRD charts/orly-operator/crds/orlyrelay.yaml is identical to crds/orlyrelay.yaml"
else
  fail "chart CRD differs from crds/orlyrelay.yaml; fix: cp crds/orlyrelay.yaml charts/orly-operator/crds/"
fi

# --- lint and render: default values, then each example values file ------------------------
value_sets=(default)
for f in "$chart"/examples/values-*.yaml; do
  value_sets+=("$(basename "$f" .yaml)")
done
rendered=()
for set in "${value_sets[@]}"; do
  args=()
  [[ $set == default ]] || args=(-f "$chart/examples/$set.yaml")
  if out=$(helm lint --strict "$chart" "${args[@]}" 2>&1); then
    ok "helm lint --strict ($set): $(grep -E 'chart\(s\) linted' <<<"$out")"
  else
    fail "helm lint --strict ($set):"
    printf '      %s\n' "${out//$'\n'/$'\n'      }"
  fi
  if helm template orly "$chart" --namespace orly-system "${args[@]}" \
    >"$work/$set.yaml" 2>"$work/$set.err"; then
    ok "helm template ($set): $(grep -c '^kind:' "$work/$set.yaml") objects"
    rendered+=("$work/$set.yaml")
  else
    fail "helm template ($set):"
    sed 's/^/      /' "$work/$set.err"
  fi
done

# --- validate: rendered manifests, example OrlyRelays, the CRD itself ----------------------
examples=("$root"/operator/examples/*.yaml)
invalid=("$root"/operator/tests/invalid/*.yaml)
# The exit status is the number of failed checks (capped at 100).
status=0
"$venv/bin/python" - "$root" "${CHECK_CHART_KUBE_VERSIONS:-}" "${#rendered[@]}" \
  "${rendered[@]}" "${examples[@]}" -- "${invalid[@]}" <<'PY' || status=$?
import copy
import functools
import os
import re
import sys

import jsonschema
import yaml
import kubernetes_validate.utils as kv

root, versions_arg, n_rendered, *rest = sys.argv[1:]
n_rendered = int(n_rendered)
split = rest.index("--")
rendered, examples, invalid = rest[:n_rendered], rest[n_rendered:split], rest[split + 1:]
failures = 0


def ok(msg):
    print(f"ok    {msg}")


def fail(msg, details=()):
    global failures
    failures += 1
    print(f"FAIL  {msg}")
    for d in details:
        print(f"      {d}")


def rel(path):
    return os.path.relpath(path, root) if path.startswith(root) else os.path.basename(path)


# Kubernetes versions: the chart's minimum, kubectl's, the newest the package knows.
known = kv.all_versions()
if versions_arg.strip():
    versions = versions_arg.split()
else:
    versions = sorted({"1.29.0", "1.34.0", known[-1]}, key=lambda v: tuple(map(int, v.split("."))))
versions = [v if v.count(".") == 2 else v + ".0" for v in versions]

# kubernetes-validate re-reads its (large) definitions file on every call; cache the reads.
kv.schema_contents = functools.lru_cache(maxsize=None)(kv.schema_contents)


def load(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


# --- the CRD's schema as a JSON Schema --------------------------------------------------------
crd = load(os.path.join(root, "crds/orlyrelay.yaml"))[0]
group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
crd_versions = {v["name"]: v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"]}


def structural(schema):
    """OpenAPI v3 (Kubernetes flavour) -> JSON Schema: nullable, int-or-string, and unknown
    fields refused (the API server prunes them, `kubectl apply` warns or fails on them)."""
    s = copy.deepcopy(schema)
    for key in ("x-kubernetes-validations", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
                "x-kubernetes-map-type", "x-kubernetes-embedded-resource"):
        s.pop(key, None)
    if s.pop("x-kubernetes-int-or-string", False):
        s.pop("type", None)
        s["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if s.pop("nullable", False) and "type" in s:
        s["type"] = [s["type"], "null"]
    preserve = s.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in s:
        s["properties"] = {k: structural(v) for k, v in s["properties"].items()}
        if not preserve and "additionalProperties" not in s:
            s["additionalProperties"] = False
    if isinstance(s.get("additionalProperties"), dict):
        s["additionalProperties"] = structural(s["additionalProperties"])
    if "items" in s:
        s["items"] = structural(s["items"])
    for key in ("anyOf", "allOf", "oneOf"):
        if key in s:
            s[key] = [structural(x) for x in s[key]]
    return s


validators = {}
for name, schema in crd_versions.items():
    s = structural(schema)
    # apiVersion, kind and metadata are the API server's; check what it would refuse.
    s["properties"]["apiVersion"] = {"const": f"{group}/{name}"}
    s["properties"]["kind"] = {"const": kind}
    s["properties"]["metadata"] = {
        "type": "object",
        "required": ["name"],
        "properties": {"name": {"type": "string", "maxLength": 253,
                                "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}},
    }
    s["required"] = sorted(set(s.get("required", [])) | {"apiVersion", "kind", "metadata"})
    jsonschema.Draft7Validator.check_schema(s)
    validators[name] = jsonschema.Draft7Validator(s, format_checker=jsonschema.Draft7Validator.FORMAT_CHECKER)


def crd_errors(doc):
    version = str(doc.get("apiVersion", "")).partition("/")[2]
    validator = validators.get(version)
    if validator is None:
        return [f"apiVersion {doc.get('apiVersion')!r}: the CRD serves {sorted(validators)}"]
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.path)))]


def k8s_errors(doc, version):
    try:
        kv.validate(doc, version, strict=True)
        return []
    except kv.ValidationError as e:
        return [f"{'.'.join(map(str, e.path)) or '(root)'}: {e.message}"]
    except kv.SchemaNotFoundError as e:
        return [e.message]


def name_of(doc):
    meta = doc.get("metadata") or {}
    ns = meta.get("namespace")
    return f"{doc.get('kind')}/{(ns + '/') if ns else ''}{meta.get('name')}"


def check_docs(label, docs):
    errors = []
    for doc in docs:
        if doc.get("apiVersion", "").startswith(group + "/"):
            errors += [f"{name_of(doc)} (CRD): {e}" for e in crd_errors(doc)]
        else:
            for v in versions:
                errors += [f"{name_of(doc)} (Kubernetes {v}): {e}" for e in k8s_errors(doc, v)]
    relays = sum(1 for d in docs if d.get("apiVersion", "").startswith(group + "/"))
    others = len(docs) - relays
    vs = ", ".join(v.rsplit(".", 1)[0] for v in versions)
    parts = []
    if others:
        parts.append(f"{others} object(s) against the Kubernetes {vs} schemas (strict)")
    if relays:
        parts.append(f"{relays} OrlyRelay(s) against the CRD schema")
    what = " and ".join(parts)
    if errors:
        fail(f"validate {label}: {what}", errors)
    else:
        ok(f"validate {label}: {what}: valid")


# --- rendered charts ---------------------------------------------------------------------------
for path in rendered:
    docs = load(path)
    check_docs(f"rendered {os.path.basename(path)[:-5]}", docs)

    # Every RBAC rule carries a comment naming the code that needs it (STYLE.md).
    text = open(path).read()
    bare = []
    for block in text.split("\n---"):
        if not re.search(r"^kind: (Cluster)?Role$", block, re.M):
            continue
        lines = block.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"^\s*- apiGroups:", line) and not lines[i - 1].lstrip().startswith("#"):
                name = re.search(r"^  name: (.*)$", block, re.M).group(1)
                bare.append(f"{name}: {line.strip()}")
    roles = len(re.findall(r"^kind: (?:Cluster)?Role$", text, re.M))
    if bare:
        fail(f"RBAC comments ({os.path.basename(path)[:-5]}): rules without a comment", bare)
    else:
        ok(f"RBAC comments ({os.path.basename(path)[:-5]}): every rule of {roles} (Cluster)Role(s) has one")

    # Every child kind the controller watches (controller.rs `run`) is granted list and watch.
    controller_rs = open(os.path.join(root, "operator/src/controller.rs")).read()
    run_body = controller_rs[controller_rs.index("pub async fn run("):]
    watched = set(re.findall(r"scoped_api::<(?:PartialObjectMeta<)?(\w+)>?>?\(", run_body))
    watched.discard("DeserializeGuard")
    plural = {"ConfigMap": ("", "configmaps"), "Service": ("", "services"),
              "Secret": ("", "secrets"), "Deployment": ("apps", "deployments"),
              "StatefulSet": ("apps", "statefulsets"),
              "PodDisruptionBudget": ("policy", "poddisruptionbudgets"),
              "HorizontalPodAutoscaler": ("autoscaling", "horizontalpodautoscalers"),
              "NetworkPolicy": ("networking.k8s.io", "networkpolicies")}
    missing = []
    for doc in docs:
        if doc.get("kind") not in ("ClusterRole", "Role") or doc["metadata"]["name"].endswith("-leader-election"):
            continue
        granted = set()
        for rule in doc.get("rules", []):
            if {"list", "watch"} <= set(rule.get("verbs", [])):
                granted |= {(g, r) for g in rule.get("apiGroups", []) for r in rule.get("resources", [])}
        for kind in sorted(watched):
            if kind not in plural:
                missing.append(f"{doc['metadata']['name']}: {kind} is watched but unknown to this check")
            elif plural[kind] not in granted:
                missing.append(f"{doc['metadata']['name']}: no list/watch on {plural[kind][1]} ({kind})")
    if missing or not watched:
        fail(f"RBAC covers the watches ({os.path.basename(path)[:-5]})", missing or ["no watch found in controller.rs"])
    else:
        ok(f"RBAC covers the watches ({os.path.basename(path)[:-5]}): list and watch on all {len(watched)} child kinds")

    # The env the chart gives the operator is env the binary reads (operator/src/main.rs).
    main_rs = open(os.path.join(root, "operator/src/main.rs")).read()
    read = set(re.findall(r'env\s*=\s*"([A-Z0-9_]+)"', main_rs))
    set_env = set()
    for doc in docs:
        if doc.get("kind") == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                set_env |= {e["name"] for e in c.get("env", [])}
    unknown = sorted(set_env - read)
    if unknown:
        fail(f"operator env ({os.path.basename(path)[:-5]}): not read by operator/src/main.rs: {unknown}")
    else:
        ok(f"operator env ({os.path.basename(path)[:-5]}): all {len(set_env)} names are flags of orly-operator")

# --- example OrlyRelays --------------------------------------------------------------------
for path in examples:
    check_docs(rel(path), load(path))

# The validator must refuse the invalid examples whose error is structural (the others break a
# CEL rule, which only the Rust tests and the API server evaluate).
cel_messages = set()


def collect(s):
    if isinstance(s, dict):
        for rule in s.get("x-kubernetes-validations", []):
            cel_messages.add(rule["message"])
        for v in s.values():
            collect(v)
    elif isinstance(s, list):
        for v in s:
            collect(v)


collect(crd_versions)
refused, missed, cel_only = 0, [], 0
for path in invalid:
    expect = re.search(r"^# expect: (.*)$", open(path).read(), re.M)
    if expect and any(expect.group(1).strip() in m or m in expect.group(1) for m in cel_messages):
        cel_only += 1
        continue
    if any(crd_errors(d) for d in load(path)):
        refused += 1
    else:
        missed.append(rel(path))
if missed:
    fail("invalid OrlyRelays: the CRD schema check accepts", missed)
elif invalid:
    ok(f"invalid OrlyRelays: all {refused} with a schema error refused "
       f"({cel_only} more break CEL rules, checked by operator/tests/crd_validation.rs)")

# --- the CRD itself --------------------------------------------------------------------------
check_docs("crds/orlyrelay.yaml", [crd])

sys.exit(min(failures, 100))
PY
failures=$((failures + status))

if ((failures)); then
  echo "check-chart: $failures check(s) failed"
  exit 1
fi
echo "check-chart: all checks passed"
