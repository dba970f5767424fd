{{/* The Service and NetworkPolicy of each service. */}}

{{/* The Service clients use; it carries the metrics port Prometheus scrapes. */}}
{{- define "alignd.service" -}}
{{- $root := .root }}
{{- $svc := index $root.Values .name }}
{{- if $svc.enabled }}
{{- $annotate := and $root.Values.metrics.serviceAnnotations (not $root.Values.metrics.serviceMonitor.enabled) }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "alignd.component" . }}
  labels:
    {{- include "alignd.componentLabels" . | nindent 4 }}
    alignd.io/metrics: "true"
  {{- if or $annotate $svc.service.annotations }}
  annotations:
    {{- if $annotate }}
    prometheus.io/scrape: "true"
    prometheus.io/port: {{ $svc.ports.metrics | quote }}
    prometheus.io/path: /metrics
    prometheus.io/scheme: http
    {{- end }}
    {{- with $svc.service.annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
spec:
  type: {{ $svc.service.type }}
  selector:
    {{- include "alignd.selectorLabels" . | nindent 4 }}
    {{- if eq .name "trainer" }}
    statefulset.kubernetes.io/pod-name: {{ include "alignd.component" . }}-0
    {{- end }}
  ports:
    - {name: grpc, port: {{ $svc.ports.grpc }}, targetPort: grpc, protocol: TCP, appProtocol: grpc}
    - {name: metrics, port: {{ $svc.ports.metrics }}, targetPort: metrics, protocol: TCP, appProtocol: http}
{{- end }}
{{- end }}

{{/*
Who may connect: the job driver (and the trainer, to generation) on gRPC; reward from anywhere
when reward.networkPolicy.public; the metrics port from the networkPolicy.metricsFrom peers
only (nobody when empty: a rule without peers would admit everyone), or from anywhere with
networkPolicy.metricsFromAnywhere; trainer pods among themselves on every port (rendezvous,
collectives).
*/}}
{{- define "alignd.networkPolicy" -}}
{{- $root := .root }}
{{- $svc := index $root.Values .name }}
{{- if and $svc.enabled $root.Values.networkPolicy.enabled }}
{{- $public := and (eq .name "reward") $svc.networkPolicy.public }}
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: {{ include "alignd.component" . }}
  labels:
    {{- include "alignd.componentLabels" . | nindent 4 }}
spec:
  podSelector:
    matchLabels:
      {{- include "alignd.selectorLabels" . | nindent 6 }}
  policyTypes: [Ingress]
  ingress:
    - ports:
        - {port: grpc, protocol: TCP}
      {{- if not $public }}
      from:
        - podSelector:
            matchLabels:
              {{- toYaml $root.Values.networkPolicy.driverPodLabels | nindent 14 }}
        {{- if eq .name "generation" }}
        - podSelector:
            matchLabels:
              {{- include "alignd.selectorLabels" (dict "root" $root "name" "trainer") | nindent 14 }}
        {{- end }}
        {{- with $svc.networkPolicy.from }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
    {{- if $root.Values.networkPolicy.metricsFromAnywhere }}
    - ports:
        - {port: metrics, protocol: TCP}
    {{- else if $root.Values.networkPolicy.metricsFrom }}
    - ports:
        - {port: metrics, protocol: TCP}
      from:
        {{- toYaml $root.Values.networkPolicy.metricsFrom | nindent 8 }}
    {{- end }}
    {{- if eq .name "trainer" }}
    - from:
        - podSelector:
            matchLabels:
              {{- include "alignd.selectorLabels" . | nindent 14 }}
    {{- end }}
{{- end }}
{{- end }}
