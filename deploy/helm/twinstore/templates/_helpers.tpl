{{/* Names: the chart name, and <release>-<chart> unless the release name contains it. */}}
{{- define "twinstore.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "twinstore.fullname" -}}
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

{{- define "twinstore.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object; call with (dict "root" $ "component" "api"). */}}
{{- define "twinstore.labels" -}}
helm.sh/chart: {{ include "twinstore.chart" .root }}
{{ include "twinstore.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
app.kubernetes.io/part-of: twinstore
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels (immutable in Deployments: never add to them). */}}
{{- define "twinstore.selectorLabels" -}}
app.kubernetes.io/name: {{ include "twinstore.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end }}

{{- define "twinstore.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "twinstore.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "twinstore.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The chart's own Secret (inline secret values) and ConfigMap. */}}
{{- define "twinstore.secretName" -}}
{{- include "twinstore.fullname" . }}
{{- end }}

{{- define "twinstore.configMapName" -}}
{{- include "twinstore.fullname" . }}
{{- end }}

{{/* Which secret values the chart stores itself (non-empty inline values). */}}
{{- define "twinstore.hasInlineSecrets" -}}
{{- $v := .Values }}
{{- if or $v.database.url (and $v.nats.url (not $v.nats.existingSecret.name)) $v.auth.users.htpasswd $v.auth.jwt.issuers $v.audit.signingKey }}true{{ end }}
{{- end }}

{{/* A secretKeyRef for TWINSTORE_DATABASE_URL / TWINSTORE_NATS_URL: the chart's Secret when
     the URL is inline, else the existing Secret; a missing both is an error. */}}
{{- define "twinstore.databaseUrlRef" -}}
{{- if .Values.database.url }}
name: {{ include "twinstore.secretName" . }}
key: database-url
{{- else if .Values.database.existingSecret.name }}
name: {{ .Values.database.existingSecret.name }}
key: {{ .Values.database.existingSecret.key }}
{{- else }}
{{- fail "database: set database.url or database.existingSecret.name (without a database URL twinstore would start an embedded PostgreSQL inside the pod)" }}
{{- end }}
{{- end }}

{{- define "twinstore.natsUrlRef" -}}
{{- if .Values.nats.existingSecret.name }}
name: {{ .Values.nats.existingSecret.name }}
key: {{ .Values.nats.existingSecret.key }}
{{- else if .Values.nats.url }}
name: {{ include "twinstore.secretName" . }}
key: nats-url
{{- else }}
{{- fail "nats: set nats.url or nats.existingSecret.name (without a NATS URL twinstore would start an embedded NATS inside the pod)" }}
{{- end }}
{{- end }}

{{/* A setting's value as twinstore reads it from the environment: strings as they are,
     everything else as JSON (numbers without Go's 1e+06 notation, lists and tables). */}}
{{- define "twinstore.settingValue" -}}
{{- if kindIs "string" . }}{{ . }}{{ else }}{{ toJson . }}{{ end }}
{{- end }}

{{/* Files mounted from secrets. */}}
{{- define "twinstore.usersFile" -}}/etc/twinstore/users/users.htpasswd{{- end }}
{{- define "twinstore.auditKeyFile" -}}/etc/twinstore/audit/signing-key.pem{{- end }}

{{- define "twinstore.hasUsers" -}}
{{- if or .Values.auth.users.htpasswd .Values.auth.users.existingSecret.name }}true{{ end }}
{{- end }}

{{- define "twinstore.hasJwt" -}}
{{- if or .Values.auth.jwt.issuers .Values.auth.jwt.existingSecret.name }}true{{ end }}
{{- end }}

{{- define "twinstore.hasAuditKey" -}}
{{- if or .Values.audit.signingKey .Values.audit.existingSecret.name }}true{{ end }}
{{- end }}

{{/* Environment of every twinstore process: the ConfigMap, then the secret URLs. */}}
{{- define "twinstore.env" -}}
- name: TWINSTORE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- include "twinstore.databaseUrlRef" . | trim | nindent 6 }}
- name: TWINSTORE_NATS_URL
  valueFrom:
    secretKeyRef:
      {{- include "twinstore.natsUrlRef" . | trim | nindent 6 }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Pod-level fields every twinstore pod shares. enableServiceLinks is off: Kubernetes would
     otherwise set TWINSTORE_PORT=tcp://... for a Service named "twinstore", which twinstore
     reads as its port setting. */}}
{{- define "twinstore.podCommon" -}}
serviceAccountName: {{ include "twinstore.serviceAccountName" . }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- end }}

{{/* Scheduling of one role; call with the role's values. */}}
{{- define "twinstore.scheduling" -}}
{{- with .priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .topologySpreadConstraints }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Rollouts on config changes: checksums of the ConfigMap and of the chart's Secret. */}}
{{- define "twinstore.checksums" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include (print .Template.BasePath "/secret.yaml") . | sha256sum }}
{{- end }}

{{/* Probes on a named port; call with (dict "root" $ "port" "http"). */}}
{{- define "twinstore.probes" -}}
{{- $p := .root.Values.probes }}
startupProbe:
  httpGet:
    path: /health
    port: {{ .port }}
  periodSeconds: {{ $p.startup.periodSeconds }}
  timeoutSeconds: {{ $p.startup.timeoutSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
livenessProbe:
  httpGet:
    path: /health
    port: {{ .port }}
  periodSeconds: {{ $p.liveness.periodSeconds }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
readinessProbe:
  httpGet:
    path: /ready
    port: {{ .port }}
  periodSeconds: {{ $p.readiness.periodSeconds }}
  timeoutSeconds: {{ $p.readiness.timeoutSeconds }}
  failureThreshold: {{ $p.readiness.failureThreshold }}
{{- end }}

{{/* Whether a role runs more than one pod at all times (PodDisruptionBudget). */}}
{{- define "twinstore.needsPdb" -}}
{{- if .autoscaling.enabled }}
{{- if gt (int .autoscaling.minReplicas) 1 }}true{{ end }}
{{- else if gt (int .replicas) 1 }}true{{ end }}
{{- end }}
