{{/*
Helpers of the orly-operator chart: names, the recommended labels, the operator's RBAC rules.
*/}}

{{/* Chart name, overridable. */}}
{{- define "orly-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name: the prefix of every object name. Truncated so that the per-namespace suffixes
("-<namespace>") still fit in 63 characters in most cases.
*/}}
{{- define "orly-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Chart label value: name-version. */}}
{{- define "orly-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The operator image tag: image.tag, else the chart's appVersion. */}}
{{- define "orly-operator.imageTag" -}}
{{- default .Chart.AppVersion .Values.image.tag }}
{{- end }}

{{/*
Recommended labels (app.kubernetes.io/*) of every object of the release. The version label
is the operator's version, which is what the objects run.
*/}}
{{- define "orly-operator.labels" -}}
helm.sh/chart: {{ include "orly-operator.chart" . }}
{{ include "orly-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ include "orly-operator.imageTag" . | trunc 63 | trimSuffix "-" | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: orly
{{- end }}

{{/* Selector labels: stable across upgrades (a Deployment's selector is immutable). */}}
{{- define "orly-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "orly-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "orly-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "orly-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Lease name base: leaderElection.leaseName, else the full name. */}}
{{- define "orly-operator.leaseName" -}}
{{- default (include "orly-operator.fullname" .) .Values.leaderElection.leaseName }}
{{- end }}

{{/*
The operator instances: one per watched namespace, or one watching all namespaces. Returned
as JSON ({"instances": [{"name", "namespace", "lease"}]}) for fromJson.
*/}}
{{- define "orly-operator.instances" -}}
{{- $fullname := include "orly-operator.fullname" . }}
{{- $lease := include "orly-operator.leaseName" . }}
{{- $instances := list }}
{{- if .Values.watchNamespaces }}
{{- range .Values.watchNamespaces }}
{{- $instances = append $instances (dict "name" (printf "%s-%s" $fullname . | trunc 63 | trimSuffix "-") "namespace" . "lease" (printf "%s-%s" $lease . | trunc 63 | trimSuffix "-")) }}
{{- end }}
{{- else }}
{{- $instances = append $instances (dict "name" $fullname "namespace" "" "lease" $lease) }}
{{- end }}
{{- dict "instances" $instances | toJson }}
{{- end }}

{{/*
The operator's rules on OrlyRelays and their children, in the namespaces it watches. Each rule
names the code that needs it (operator/src/*.rs); docs/operator.md lists the same needs.
Granted by a ClusterRole when all namespaces are watched, else by a Role per namespace.
*/}}
{{- define "orly-operator.watchRules" -}}
# The controller's main watch (controller.rs `run`: Controller::new on OrlyRelays), and
# `report_invalid_object` reading the current status of an OrlyRelay that does not deserialize
# (get_opt).
- apiGroups: ["orly.dev"]
  resources: ["orlyrelays"]
  verbs: ["get", "list", "watch"]
# Status written through the status subresource with server-side apply
# (controller.rs `patch_status`: Api::patch_status).
- apiGroups: ["orly.dev"]
  resources: ["orlyrelays/status"]
  verbs: ["patch"]
# Children carry a controller owner reference with blockOwnerDeletion: true (plan.rs
# `controller_owner_ref`, set by builders.rs `child_meta`); with the
# OwnerReferencesPermissionEnforcement admission plugin, setting it needs update on the owner's
# finalizers.
- apiGroups: ["orly.dev"]
  resources: ["orlyrelays/finalizers"]
  verbs: ["update"]
# Children: each component's ConfigMap (its env) and Service. Watched by the controller
# (controller.rs `run`: owns_stream over a watcher whose reflector fills the cache that
# children.rs `ChildStores::existing` reads instead of listing), applied by `apply`
# (server-side apply: patch, and create for a child that does not exist yet), deleted by
# `delete_child` when no longer wanted and by `apply_component` when a Service must change
# between headless and not (clusterIP is immutable).
- apiGroups: [""]
  resources: ["configmaps", "services"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Children: workloads. db on SQLite is a StatefulSet, everything else a Deployment; watched and
# cached the same way (the cache gives tier gating the workloads' availability and the
# autoscaling handoff the owner of spec.replicas), applied by `apply`, deleted by `delete_child`
# (a disabled sync service) and `apply_component` (db switching between the two kinds).
- apiGroups: ["apps"]
  resources: ["deployments", "statefulsets"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Children: a PodDisruptionBudget per component that can run more than one replica; watched
# and cached, applied by `apply_component`, deleted by `delete_child` when no longer wanted.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Children: a HorizontalPodAutoscaler (autoscaling/v2) per component with autoscaling; watched
# and cached (children.rs `deployment_replicas` waits for it), applied by `apply_component`,
# deleted by `delete_child` when autoscaling is removed.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# Children: a NetworkPolicy per component (builders.rs `build_network_policy`); watched and
# cached, applied by `apply_component`, deleted by `delete_child` when spec.networkPolicy is
# turned off or the component goes.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "watch", "create", "patch", "delete"]
# The gRPC token Secret <relay>-grpc-auth: created once by controller.rs
# `create_grpc_auth_secret` (a create, never an update, so the token never changes); watched
# as metadata only (list, watch: the operator's cache holds no token) to know it exists. No get,
# patch or delete: the owner reference removes it with the OrlyRelay.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["list", "watch", "create"]
# Events on tier transitions and failures (controller.rs `publish`: kube-runtime's Recorder
# creates an events.k8s.io/v1 Event and patches it when the same Event repeats).
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
