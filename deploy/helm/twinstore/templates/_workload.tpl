{{/*
One twinstore role as a Deployment. Call with
  (dict "root" $ "component" "api" "role" .Values.api "args" (list ...) "portName" "http"
        "port" 8080 "api" true)
The API gets the users file, JWT issuers and the audit key; the workers serve /metrics,
/health and /ready on metrics.port (TWINSTORE_METRICS_PORT).
*/}}
{{- define "twinstore.deployment" -}}
{{- $root := .root }}
{{- $role := .role }}
{{- $ctx := dict "root" $root "component" .component }}
{{- $grace := default 25 $root.Values.settings.shutdown_grace_seconds }}
{{- if le (float64 $role.terminationGracePeriodSeconds) (float64 $grace) }}
{{- fail (printf "%s.terminationGracePeriodSeconds (%v) must be above settings.shutdown_grace_seconds (%v): Kubernetes kills the process when it runs out" .component $role.terminationGracePeriodSeconds $grace) }}
{{- end }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "twinstore.fullname" $root }}-{{ .component }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "twinstore.labels" $ctx | nindent 4 }}
spec:
  {{- if not $role.autoscaling.enabled }}
  replicas: {{ $role.replicas }}
  {{- end }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "twinstore.selectorLabels" $ctx | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "twinstore.labels" $ctx | nindent 8 }}
        {{- with $role.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        {{- include "twinstore.checksums" $root | nindent 8 }}
        {{- with $role.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- include "twinstore.podCommon" $root | nindent 6 }}
      terminationGracePeriodSeconds: {{ $role.terminationGracePeriodSeconds }}
      {{- with include "twinstore.scheduling" $role }}
      {{- . | trim | nindent 6 }}
      {{- end }}
      containers:
        - name: {{ .component }}
          image: {{ include "twinstore.image" $root }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          args:
            {{- toYaml (concat .args $role.extraArgs) | nindent 12 }}
          ports:
            - name: {{ .portName }}
              containerPort: {{ .port }}
              protocol: TCP
          envFrom:
            - configMapRef:
                name: {{ include "twinstore.configMapName" $root }}
          env:
            {{- if not .api }}
            - name: TWINSTORE_METRICS_PORT
              value: {{ .port | quote }}
            {{- end }}
            {{- if .api }}
            {{- if include "twinstore.hasUsers" $root }}
            - name: TWINSTORE_USERS_FILE
              value: {{ include "twinstore.usersFile" $root }}
            {{- end }}
            {{- if include "twinstore.hasJwt" $root }}
            - name: TWINSTORE_JWT_ISSUERS
              valueFrom:
                secretKeyRef:
                  {{- if $root.Values.auth.jwt.existingSecret.name }}
                  name: {{ $root.Values.auth.jwt.existingSecret.name }}
                  key: {{ $root.Values.auth.jwt.existingSecret.key }}
                  {{- else }}
                  name: {{ include "twinstore.secretName" $root }}
                  key: jwt-issuers.json
                  {{- end }}
            {{- end }}
            {{- if include "twinstore.hasAuditKey" $root }}
            - name: TWINSTORE_AUDIT_SIGNING_KEY
              value: {{ include "twinstore.auditKeyFile" $root }}
            {{- end }}
            {{- end }}
            {{- include "twinstore.env" $root | nindent 12 }}
            {{- with $role.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- include "twinstore.probes" (dict "root" $root "port" .portName) | trim | nindent 10 }}
          {{- if and .api $role.preStopSleepSeconds }}
          lifecycle:
            preStop:
              sleep:
                seconds: {{ $role.preStopSleepSeconds }}
          {{- end }}
          resources:
            {{- toYaml $role.resources | nindent 12 }}
          securityContext:
            {{- toYaml $root.Values.securityContext | nindent 12 }}
          volumeMounts:
            - name: tmp
              mountPath: /tmp
            {{- if and .api (include "twinstore.hasUsers" $root) }}
            - name: users
              mountPath: {{ dir (include "twinstore.usersFile" $root) }}
              readOnly: true
            {{- end }}
            {{- if and .api (include "twinstore.hasAuditKey" $root) }}
            - name: audit-key
              mountPath: {{ dir (include "twinstore.auditKeyFile" $root) }}
              readOnly: true
            {{- end }}
            {{- with $role.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 64Mi
        {{- if and .api (include "twinstore.hasUsers" $root) }}
        - name: users
          secret:
            {{- /* a directory mount (no subPath) so that Kubernetes' updates reach the file */}}
            {{- include "twinstore.usersVolume" $root | nindent 12 }}
        {{- end }}
        {{- if and .api (include "twinstore.hasAuditKey" $root) }}
        - name: audit-key
          secret:
            {{- include "twinstore.auditKeyVolume" $root | nindent 12 }}
        {{- end }}
        {{- with $role.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
{{- end }}

{{- define "twinstore.usersVolume" -}}
{{- $u := .Values.auth.users -}}
secretName: {{ ternary $u.existingSecret.name (include "twinstore.secretName" .) (not (empty $u.existingSecret.name)) }}
defaultMode: 0440
items:
  - key: {{ ternary $u.existingSecret.key "users.htpasswd" (not (empty $u.existingSecret.name)) }}
    path: {{ base (include "twinstore.usersFile" .) }}
{{- end }}

{{- define "twinstore.auditKeyVolume" -}}
{{- $a := .Values.audit -}}
secretName: {{ ternary $a.existingSecret.name (include "twinstore.secretName" .) (not (empty $a.existingSecret.name)) }}
defaultMode: 0440
items:
  - key: {{ ternary $a.existingSecret.key "signing-key.pem" (not (empty $a.existingSecret.name)) }}
    path: {{ base (include "twinstore.auditKeyFile" .) }}
{{- end }}

{{/* A HorizontalPodAutoscaler for one role; same arguments as twinstore.deployment. */}}
{{- define "twinstore.hpa" -}}
{{- $a := .role.autoscaling }}
{{- if $a.enabled }}
{{- if not (or $a.targetCPUUtilizationPercentage $a.targetMemoryUtilizationPercentage) }}
{{- fail (printf "%s.autoscaling: set targetCPUUtilizationPercentage or targetMemoryUtilizationPercentage" .component) }}
{{- end }}
{{- if lt (int $a.maxReplicas) (int $a.minReplicas) }}
{{- fail (printf "%s.autoscaling: maxReplicas must be at least minReplicas" .component) }}
{{- end }}
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata:
  name: {{ include "twinstore.fullname" .root }}-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "twinstore.labels" (dict "root" .root "component" .component) | nindent 4 }}
spec:
  scaleTargetRef:
    apiVersion: apps/v1
    kind: Deployment
    name: {{ include "twinstore.fullname" .root }}-{{ .component }}
  minReplicas: {{ $a.minReplicas }}
  maxReplicas: {{ $a.maxReplicas }}
  metrics:
    {{- if $a.targetCPUUtilizationPercentage }}
    - type: Resource
      resource:
        name: cpu
        target:
          type: Utilization
          averageUtilization: {{ $a.targetCPUUtilizationPercentage }}
    {{- end }}
    {{- if $a.targetMemoryUtilizationPercentage }}
    - type: Resource
      resource:
        name: memory
        target:
          type: Utilization
          averageUtilization: {{ $a.targetMemoryUtilizationPercentage }}
    {{- end }}
{{- end }}
{{- end }}

{{/* A PodDisruptionBudget for one role, only when it always runs more than one pod. */}}
{{- define "twinstore.pdb" -}}
{{- if and .root.Values.podDisruptionBudget.enabled (include "twinstore.needsPdb" .role) }}
apiVersion: policy/v1
kind: PodDisruptionBudget
metadata:
  name: {{ include "twinstore.fullname" .root }}-{{ .component }}
  namespace: {{ .root.Release.Namespace }}
  labels:
    {{- include "twinstore.labels" (dict "root" .root "component" .component) | nindent 4 }}
spec:
  maxUnavailable: {{ .root.Values.podDisruptionBudget.maxUnavailable }}
  selector:
    matchLabels:
      {{- include "twinstore.selectorLabels" (dict "root" .root "component" .component) | nindent 6 }}
{{- end }}
{{- end }}
