{{/* Names */}}
{{- define "tcapguard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tcapguard.fullname" -}}
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

{{- define "tcapguard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tcapguard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tcapguard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "tcapguard.labels" -}}
helm.sh/chart: {{ include "tcapguard.chart" . }}
{{ include "tcapguard.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "tcapguard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "tcapguard.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tcapguard.launcherServiceAccountName" -}}
{{- if .Values.podLauncher.serviceAccount.create }}
{{- default (printf "%s-launcher" (include "tcapguard.fullname" .) | trunc 63 | trimSuffix "-") .Values.podLauncher.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.podLauncher.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "tcapguard.configMapName" -}}
{{- default (printf "%s-config" (include "tcapguard.fullname" .)) .Values.existingConfigMap }}
{{- end }}

{{- define "tcapguard.mlflowName" -}}
{{- printf "%s-mlflow" (include "tcapguard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The image: tag defaults to appVersion, "-cuda" when a GPU is requested. */}}
{{- define "tcapguard.image" -}}
{{- $suffix := ternary "-cuda" "" (gt (int .Values.gpu) 0) }}
{{- $tag := default (printf "%s%s" .Chart.AppVersion $suffix) .Values.image.tag }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}

{{- define "tcapguard.mlflowImage" -}}
{{- $img := .Values.mlflow.server.image }}
{{- printf "%s:%s" (default .Values.image.repository $img.repository) (default .Chart.AppVersion $img.tag) }}
{{- end }}

{{- define "tcapguard.trackingUri" -}}
{{- if .Values.mlflow.server.enabled }}
{{- printf "http://%s.%s.svc:%d" (include "tcapguard.mlflowName" .) .Release.Namespace (int .Values.mlflow.server.service.port) }}
{{- else }}
{{- .Values.mlflow.trackingUri }}
{{- end }}
{{- end }}

{{/* S3 endpoint, region and credentials (secretKeyRef only), for the scan and the MLflow server. */}}
{{- define "tcapguard.s3Env" -}}
{{- with .Values.s3 }}
{{- if .endpointUrl }}
- name: AWS_ENDPOINT_URL_S3
  value: {{ .endpointUrl | quote }}
- name: MLFLOW_S3_ENDPOINT_URL
  value: {{ .endpointUrl | quote }}
{{- end }}
{{- if .region }}
- name: AWS_DEFAULT_REGION
  value: {{ .region | quote }}
{{- end }}
{{- if .pathStyle }}
- name: TCAPGUARD_S3_PATH_STYLE
  value: "1"
{{- end }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret | quote }}
      key: {{ .accessKeyIdKey | quote }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret | quote }}
      key: {{ .secretAccessKeyKey | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* extraEnv, refusing literal values for names that look like credentials. */}}
{{- define "tcapguard.extraEnv" -}}
{{- range .Values.extraEnv }}
{{- if and (hasKey . "value") (regexMatch "(?i)(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)" .name) }}
{{- fail (printf "extraEnv %s carries a literal value; credentials must come from a Secret (valueFrom.secretKeyRef or extraEnvFrom)" .name) }}
{{- end }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "tcapguard.scanEnv" -}}
{{- with include "tcapguard.trackingUri" . }}
- name: MLFLOW_TRACKING_URI
  value: {{ . | quote }}
{{- end }}
{{- with include "tcapguard.s3Env" . | trim }}
{{ . }}
{{- end }}
{{- with include "tcapguard.extraEnv" . | trim }}
{{ . }}
{{- end }}
{{- end }}

{{/* The scan pod: `tcapguard run <config>`; shared by the Job and the CronJob. */}}
{{- define "tcapguard.scanPodTemplate" -}}
metadata:
  labels:
    {{- include "tcapguard.selectorLabels" . | nindent 4 }}
    app.kubernetes.io/component: scan
    {{- with .Values.scan.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  annotations:
    checksum/config: {{ toJson .Values.config | sha256sum }}
    {{- with .Values.scan.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "tcapguard.serviceAccountName" . }}
  automountServiceAccountToken: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.runtimeClassName }}
  runtimeClassName: {{ . }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  containers:
    - name: tcapguard
      image: {{ include "tcapguard.image" . | quote }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      args: ["run", "/etc/tcapguard/config.yaml"]
      {{- $env := include "tcapguard.scanEnv" . | trim }}
      {{- if $env }}
      env:
        {{- $env | nindent 8 }}
      {{- end }}
      {{- if or .Values.mlflow.auth.existingSecret .Values.extraEnvFrom }}
      envFrom:
        {{- with .Values.mlflow.auth.existingSecret }}
        - secretRef:
            name: {{ . | quote }}
        {{- end }}
        {{- with .Values.extraEnvFrom }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- end }}
      {{- $resources := deepCopy (default dict .Values.resources) }}
      {{- if gt (int .Values.gpu) 0 }}
      {{- $limits := default dict $resources.limits }}
      {{- $_ := set $limits "nvidia.com/gpu" (int .Values.gpu) }}
      {{- $_ := set $resources "limits" $limits }}
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: config
          mountPath: /etc/tcapguard
          readOnly: true
        - name: cache
          mountPath: /cache
        - name: workspace
          mountPath: /workspace
        - name: tmp
          mountPath: /tmp
  volumes:
    - name: config
      configMap:
        name: {{ include "tcapguard.configMapName" . }}
    - name: cache
      {{- if .Values.cache.existingClaim }}
      persistentVolumeClaim:
        claimName: {{ .Values.cache.existingClaim }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .Values.cache.sizeLimit }}
      {{- end }}
    - name: workspace
      emptyDir: {}
    - name: tmp
      emptyDir: {}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/* Fail closed on values that would put a credential into a manifest. */}}
{{- define "tcapguard.validate" -}}
{{- $uris := dict "mlflow.trackingUri" .Values.mlflow.trackingUri "mlflow.server.backendStoreUri" .Values.mlflow.server.backendStoreUri "mlflow.server.artifactsDestination" .Values.mlflow.server.artifactsDestination "s3.endpointUrl" .Values.s3.endpointUrl }}
{{- range $key, $uri := $uris }}
{{- if regexMatch "://[^/@\\s]+:[^/@\\s]*@" (toString $uri) }}
{{- fail (printf "%s embeds a password in its URI; keep credentials in a Secret (mlflow.server.backendStoreSecret, mlflow.auth.existingSecret, s3.existingSecret)" $key) }}
{{- end }}
{{- end }}
{{- end }}
