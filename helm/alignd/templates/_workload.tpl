{{/* Pods of the four services: one pod template, used by the Deployments and the trainer's
StatefulSet. */}}

{{/* The pod template of a service (Deployment or StatefulSet). */}}
{{- define "alignd.podTemplate" -}}
{{- $root := .root }}
{{- $name := .name }}
{{- $svc := index $root.Values $name }}
{{- $writable := has $name (list "generation" "trainer") }}
{{- $prepare := and $root.Values.models.prepare (has $svc.model (splitList " " (include "alignd.bundledModels" .))) }}
metadata:
  labels:
    {{- include "alignd.componentLabels" . | nindent 4 }}
    {{- with $svc.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ include "alignd.settingsEnv" . | sha256sum }}
    {{- with $svc.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "alignd.serviceAccountName" $root }}
  automountServiceAccountToken: false
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $root.Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ $svc.terminationGracePeriodSeconds }}
  {{- if $prepare }}
  initContainers:
    - name: prepare-model
      image: {{ include "alignd.image" . }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      command: ["flock", "{{ $root.Values.home.mountPath }}/.prepare.lock", "alignd", "models", "prepare", {{ $svc.model | quote }}]
      env:
        - name: ALIGND_HOME
          value: {{ $root.Values.home.mountPath | quote }}
        {{- with $root.Values.models.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      resources:
        {{- toYaml $root.Values.models.resources | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - {name: home, mountPath: {{ $root.Values.home.mountPath }}}
        - {name: tmp, mountPath: /tmp}
        - {name: cache, mountPath: /home/alignd/.cache}
  {{- end }}
  containers:
    - name: {{ $name }}
      image: {{ include "alignd.image" . }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      args: ["serve", {{ $name | quote }}{{ range $svc.args }}, {{ . | quote }}{{ end }}]
      ports:
        - {name: grpc, containerPort: {{ $svc.ports.grpc }}, protocol: TCP}
        - {name: metrics, containerPort: {{ $svc.ports.metrics }}, protocol: TCP}
        {{- if eq $name "trainer" }}
        - {name: rendezvous, containerPort: {{ $svc.ports.rendezvous }}, protocol: TCP}
        {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "alignd.component" . }}
      {{- if or (eq $name "trainer") $svc.env }}
      env:
        {{- if eq $name "trainer" }}
        - name: ALIGND_NODE_RANK
          valueFrom:
            fieldRef:
              fieldPath: metadata.labels['apps.kubernetes.io/pod-index']
        {{- end }}
        {{- with $svc.env }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      startupProbe:
        {{- include "alignd.probe" (dict "root" $root "name" $name "kind" "startup") | trim | nindent 8 }}
      readinessProbe:
        {{- include "alignd.probe" (dict "root" $root "name" $name "kind" "readiness") | trim | nindent 8 }}
      livenessProbe:
        {{- include "alignd.probe" (dict "root" $root "name" $name "kind" "liveness") | trim | nindent 8 }}
      resources:
        {{- include "alignd.resources" . | nindent 8 }}
      securityContext:
        {{- toYaml $root.Values.containerSecurityContext | nindent 8 }}
      volumeMounts:
        - {name: home, mountPath: {{ $root.Values.home.mountPath }}, readOnly: {{ not $writable }}}
        - {name: tmp, mountPath: /tmp}
        - {name: cache, mountPath: /home/alignd/.cache}
        {{- if $svc.shmSize }}
        - {name: dshm, mountPath: /dev/shm}
        {{- end }}
        {{- if $root.Values.auth.enabled }}
        - {name: auth, mountPath: /etc/alignd/auth, readOnly: true}
        {{- end }}
        {{- if $root.Values.metrics.auth.enabled }}
        - {name: metrics-auth, mountPath: /etc/alignd/metrics-auth, readOnly: true}
        {{- end }}
        {{- if $root.Values.tls.enabled }}
        - {name: tls, mountPath: /etc/alignd/tls, readOnly: true}
        {{- end }}
        {{- if include "alignd.execProbes" . }}
        - {name: probe, mountPath: /etc/alignd/probe, readOnly: true}
        {{- end }}
  volumes:
    - name: home
      {{- if $root.Values.persistence.enabled }}
      persistentVolumeClaim:
        claimName: {{ include "alignd.claimName" $root }}
      {{- else }}
      emptyDir: {}
      {{- end }}
    - {name: tmp, emptyDir: {}}
    - {name: cache, emptyDir: {}}
    {{- if $svc.shmSize }}
    - name: dshm
      emptyDir: {medium: Memory, sizeLimit: {{ $svc.shmSize }}}
    {{- end }}
    {{- if $root.Values.auth.enabled }}
    - name: auth
      secret: {secretName: {{ include "alignd.authSecret" $root }}, defaultMode: 0440}
    {{- end }}
    {{- if $root.Values.metrics.auth.enabled }}
    - name: metrics-auth
      secret: {secretName: {{ include "alignd.metricsAuthSecret" $root }}, defaultMode: 0440}
    {{- end }}
    {{- if $root.Values.tls.enabled }}
    - name: tls
      secret: {secretName: {{ include "alignd.tlsSecret" $root }}, defaultMode: 0440}
    {{- end }}
    {{- if include "alignd.execProbes" . }}
    - name: probe
      configMap: {name: {{ include "alignd.fullname" $root }}-probe}
    {{- end }}
  {{- with $svc.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $svc.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $svc.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{- define "alignd.deployment" -}}
{{- $svc := index .root.Values .name }}
{{- if $svc.enabled }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "alignd.component" . }}
  labels:
    {{- include "alignd.componentLabels" . | nindent 4 }}
spec:
  {{- if not (and $svc.autoscaling $svc.autoscaling.enabled) }}
  replicas: {{ $svc.replicas }}
  {{- end }}
  selector:
    matchLabels:
      {{- include "alignd.selectorLabels" . | nindent 6 }}
  template:
    {{- include "alignd.podTemplate" . | trim | nindent 4 }}
{{- end }}
{{- end }}
