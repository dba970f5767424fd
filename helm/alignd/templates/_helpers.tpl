{{/*
Helpers shared by the four services. Component templates call them with
(dict "root" $ "name" "<service>"): one definition of a pod, ConfigMap, Service or
NetworkPolicy serves generation, reward, reference and trainer.
*/}}

{{- define "alignd.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "alignd.fullname" -}}
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

{{/* Name of one service's objects: <fullname>-<service>. */}}
{{- define "alignd.component" -}}
{{- printf "%s-%s" (include "alignd.fullname" .root) .name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "alignd.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "alignd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: alignd
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "alignd.selectorLabels" -}}
app.kubernetes.io/name: {{ include "alignd.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{- define "alignd.componentLabels" -}}
{{ include "alignd.labels" .root }}
app.kubernetes.io/component: {{ .name }}
alignd.io/role: {{ .name }}
{{- end }}

{{/* The gRPC service a role serves, the name its health status is reported under. */}}
{{- define "alignd.grpcService" -}}
alignd.v1.{{ title .name }}Service
{{- end }}

{{/* Bundled model names (alignd models list) that the prepare initContainer can prepare. */}}
{{- define "alignd.bundledModels" -}}
smollm2-135m minilm-l6
{{- end }}

{{- define "alignd.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "alignd.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "alignd.image" -}}
{{- $svc := index .root.Values .name }}
{{- $repository := $svc.image.repository | default .root.Values.image.repository }}
{{- $tag := $svc.image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion }}
{{- printf "%s:%s" $repository $tag }}
{{- end }}

{{- define "alignd.claimName" -}}
{{- .Values.persistence.existingClaim | default (printf "%s-home" (include "alignd.fullname" .)) }}
{{- end }}

{{- define "alignd.authSecret" -}}
{{- .Values.auth.existingSecret | default (printf "%s-auth" (include "alignd.fullname" .)) }}
{{- end }}

{{- define "alignd.tlsSecret" -}}
{{- .Values.tls.existingSecret | default (printf "%s-tls" (include "alignd.fullname" .)) }}
{{- end }}

{{- define "alignd.metricsAuthSecret" -}}
{{- .Values.metrics.auth.existingSecret | default (printf "%s-metrics-auth" (include "alignd.fullname" .)) }}
{{- end }}

{{/*
Generation services the trainer's PushWeights may reach (ALIGND_PUSH_TARGETS): this release's
generation Service by the names a job may use (`alignd submit` gives jobs <service>.<ns>.svc),
its headless Service, whose records are the ready pods that Platform.from_kubernetes addresses,
then trainer.pushTargets. A JSON list.
*/}}
{{- define "alignd.pushTargets" -}}
{{- $root := .root }}
{{- $targets := list }}
{{- if $root.Values.generation.enabled }}
{{- $generation := include "alignd.component" (dict "root" $root "name" "generation") }}
{{- $port := $root.Values.generation.ports.grpc }}
{{- $namespace := $root.Release.Namespace }}
{{- $domain := $root.Values.clusterDomain }}
{{- $targets = append $targets (printf "%s.%s.svc:%v" $generation $namespace $port) }}
{{- $targets = append $targets (printf "%s.%s.svc.%s:%v" $generation $namespace $domain $port) }}
{{- $targets = append $targets (printf "%s-headless.%s.svc.%s:%v" $generation $namespace $domain $port) }}
{{- end }}
{{- concat $targets $root.Values.trainer.pushTargets | toJson }}
{{- end }}

{{/* DNS name of trainer pod 0, where the ranks of every node meet. */}}
{{- define "alignd.masterAddr" -}}
{{- $trainer := include "alignd.component" (dict "root" .root "name" "trainer") }}
{{- printf "%s-0.%s-headless.%s.svc.%s" $trainer $trainer .root.Release.Namespace .root.Values.clusterDomain }}
{{- end }}

{{/*
The service's ALIGND_* settings (the ConfigMap's data): network, model, security files, the
storage root (the volume), the trainer's nodes and push targets, then the `settings` values
under their own names; lists travel as JSON, as pydantic-settings reads them.
*/}}
{{- define "alignd.settingsEnv" -}}
{{- $root := .root }}
{{- $svc := index $root.Values .name }}
{{- $env := dict
  "ALIGND_HOST" "0.0.0.0"
  "ALIGND_PORT" (toString $svc.ports.grpc)
  "ALIGND_METRICS_HOST" "0.0.0.0"
  "ALIGND_METRICS_PORT" (toString $svc.ports.metrics)
  "ALIGND_MODEL" $svc.model
  "ALIGND_LOG_LEVEL" $root.Values.logLevel
  "ALIGND_HOME" $root.Values.home.mountPath }}
{{- if $root.Values.auth.enabled }}
{{- $_ := set $env "ALIGND_AUTH_TOKEN_FILE" "/etc/alignd/auth/tokens" }}
{{- if eq .name "trainer" }}
{{- $_ := set $env "ALIGND_PUSH_TOKEN_FILE" "/etc/alignd/auth/tokens" }}
{{- end }}
{{- end }}
{{- if $root.Values.metrics.auth.enabled }}
{{- $_ := set $env "ALIGND_METRICS_AUTH_TOKEN_FILE" "/etc/alignd/metrics-auth/token" }}
{{- end }}
{{- if $root.Values.tls.enabled }}
{{- $_ := set $env "ALIGND_TLS_CERT" "/etc/alignd/tls/tls.crt" }}
{{- $_ := set $env "ALIGND_TLS_KEY" "/etc/alignd/tls/tls.key" }}
{{- if $root.Values.tls.mutual }}
{{- $_ := set $env "ALIGND_TLS_CLIENT_CA" "/etc/alignd/tls/ca.crt" }}
{{- end }}
{{- if eq .name "trainer" }}
{{- $_ := set $env "ALIGND_PUSH_TLS_CA" "/etc/alignd/tls/ca.crt" }}
{{- if $root.Values.tls.mutual }}
{{- $_ := set $env "ALIGND_PUSH_TLS_CERT" "/etc/alignd/tls/tls.crt" }}
{{- $_ := set $env "ALIGND_PUSH_TLS_KEY" "/etc/alignd/tls/tls.key" }}
{{- end }}
{{- end }}
{{- end }}
{{- if has .name (list "generation" "trainer") }}
{{- $_ := set $env "ALIGND_STORAGE_ROOT" (list $root.Values.home.mountPath | toJson) }}
{{- end }}
{{- if eq .name "trainer" }}
{{- $_ := set $env "ALIGND_PUSH_TARGETS" (include "alignd.pushTargets" .) }}
{{- $_ := set $env "ALIGND_NNODES" (toString $svc.replicas) }}
{{- $_ := set $env "ALIGND_MASTER_ADDR" (include "alignd.masterAddr" .) }}
{{- $_ := set $env "ALIGND_MASTER_PORT" (toString $svc.ports.rendezvous) }}
{{- end }}
{{- range $key, $value := $svc.settings }}
{{- $text := kindIs "slice" $value | ternary (toJson $value) (toString $value) }}
{{- $_ := set $env (printf "ALIGND_%s" (upper $key)) $text }}
{{- end }}
{{- range $key, $value := $env }}
{{ $key }}: {{ $value | quote }}
{{- end }}
{{- end }}

{{- define "alignd.configmap" -}}
{{- $svc := index .root.Values .name }}
{{- if $svc.enabled }}
apiVersion: v1
kind: ConfigMap
metadata:
  name: {{ include "alignd.component" . }}
  labels:
    {{- include "alignd.componentLabels" . | nindent 4 }}
data:
  {{- include "alignd.settingsEnv" . | trim | nindent 2 }}
{{- end }}
{{- end }}

{{/*
"true" when the service's probes run files/health_probe.py instead of the kubelet's gRPC
probe: over TLS (the kubelet probes in plaintext), and on multi-node trainers (nodes other
than node 0 run worker ranks and serve no gRPC).
*/}}
{{- define "alignd.execProbes" -}}
{{- $svc := index .root.Values .name }}
{{- if or .root.Values.tls.enabled (and (eq .name "trainer") (gt (int $svc.replicas) 1)) }}true{{ end }}
{{- end }}

{{/* One probe (dict "root" "name" "kind": startup, readiness or liveness). */}}
{{- define "alignd.probe" -}}
{{- $root := .root }}
{{- $svc := index $root.Values .name }}
{{- $timing := index $svc.probes .kind }}
{{- if include "alignd.execProbes" . }}
exec:
  command:
    - python3
    - /etc/alignd/probe/health_probe.py
    - {{ include "alignd.grpcService" . }}
    - {{ $svc.ports.grpc | quote }}
    - {{ include "alignd.component" . }}
    - {{ $root.Values.tls.enabled | ternary "/etc/alignd/tls" "" | quote }}
    - {{ $root.Values.tls.mutual | ternary "mutual" "" | quote }}
{{- else }}
grpc:
  port: {{ $svc.ports.grpc }}
  service: {{ include "alignd.grpcService" . }}
{{- end }}
periodSeconds: {{ $timing.periodSeconds }}
failureThreshold: {{ $timing.failureThreshold }}
timeoutSeconds: {{ $timing.timeoutSeconds }}
{{- end }}

{{- define "alignd.resources" -}}
{{- $svc := index .root.Values .name }}
{{- $resources := deepCopy ($svc.resources | default dict) }}
{{- if gt (int $svc.gpu) 0 }}
{{- $limits := get $resources "limits" | default dict }}
{{- $_ := set $limits "nvidia.com/gpu" (int $svc.gpu) }}
{{- $_ := set $resources "limits" $limits }}
{{- end }}
{{- toYaml $resources }}
{{- end }}

{{/* Checks across values that the schema cannot express. */}}
{{- define "alignd.validate" -}}
{{- if and .Values.tls.mutual (not .Values.tls.enabled) }}
{{- fail "tls.mutual (clients must present certificates) needs tls.enabled" }}
{{- end }}
{{- with .Values.reward.autoscaling }}
{{- if and .enabled (lt (int .maxReplicas) (int .minReplicas)) }}
{{- fail (printf "reward.autoscaling.maxReplicas (%d) is below minReplicas (%d)" (int .maxReplicas) (int .minReplicas)) }}
{{- end }}
{{- end }}
{{- if and .Values.persistence.enabled (not .Values.persistence.existingClaim) (not .Values.persistence.size) }}
{{- fail "persistence.size is needed unless persistence.existingClaim is set" }}
{{- end }}
{{- end }}
