{{/* Chart name, at most 63 characters. */}}
{{- define "cosmoforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-qualified name, at most 63 characters (DNS label). */}}
{{- define "cosmoforge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A component's name: <fullname>-<component>, at most 63 characters. */}}
{{- define "cosmoforge.component" -}}
{{- printf "%s-%s" (include "cosmoforge.fullname" .root) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "cosmoforge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels of one component; call with (dict "root" $ "component" "operator"). */}}
{{- define "cosmoforge.selectorLabels" -}}
app.kubernetes.io/name: {{ include "cosmoforge.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "cosmoforge.labels" -}}
helm.sh/chart: {{ include "cosmoforge.chart" .root }}
{{ include "cosmoforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
{{- end -}}

{{/* An image reference from {registry, repository, tag}; call with (dict "image" ... "default" tag). */}}
{{- define "cosmoforge.imageRef" -}}
{{- $tag := default .default .image.tag -}}
{{- if .image.registry -}}
{{- printf "%s/%s:%s" .image.registry .image.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "cosmoforge.image" -}}
{{- include "cosmoforge.imageRef" (dict "image" .Values.image "default" .Chart.AppVersion) -}}
{{- end -}}

{{- define "cosmoforge.operatorServiceAccount" -}}
{{- include "cosmoforge.component" (dict "root" . "component" "operator") -}}
{{- end -}}

{{/* The NATS URL every component uses: the bundled server's Service or the given one. */}}
{{- define "cosmoforge.natsUrl" -}}
{{- if .Values.nats.bundled.enabled -}}
{{- printf "nats://%s.%s.svc:4222" (include "cosmoforge.component" (dict "root" . "component" "nats")) .Release.Namespace -}}
{{- else -}}
{{- required "nats.url is required when nats.bundled.enabled is false" .Values.nats.url -}}
{{- end -}}
{{- end -}}

{{- define "cosmoforge.natsMonitoring" -}}
{{- if .Values.nats.bundled.enabled -}}
{{- printf "%s.%s.svc:8222" (include "cosmoforge.component" (dict "root" . "component" "nats")) .Release.Namespace -}}
{{- else -}}
{{- .Values.nats.monitoringEndpoint -}}
{{- end -}}
{{- end -}}

{{/* Namespaces the operator watches when not cluster-wide. */}}
{{- define "cosmoforge.watchNamespaces" -}}
{{- if .Values.operator.watch.namespaces -}}
{{- join "," .Values.operator.watch.namespaces -}}
{{- else -}}
{{- .Release.Namespace -}}
{{- end -}}
{{- end -}}

{{/* Environment shared by pods that touch object storage. */}}
{{- define "cosmoforge.storageEnv" -}}
- name: HOME
  value: /tmp
- name: HF_HOME
  value: /tmp/hf
# Where specs may write and read (cosmoforge/spec/confinement.py): under the storage root,
# never the pod's own files.
- name: COSMO_OUTPUT_BASE
  value: {{ .Values.storage.uri | quote }}
- name: COSMO_OUTPUT_ALLOW
  value: {{ join "," .Values.storage.allowedOutputs | quote }}
- name: COSMO_LOCAL_PATHS
  value: "0"
{{- with .Values.storage.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The Secret holding the dispatcher's bearer token: the given one, or the chart's. */}}
{{- define "cosmoforge.tokenSecret" -}}
{{- default (include "cosmoforge.component" (dict "root" . "component" "token")) .Values.auth.existingSecret -}}
{{- end -}}

{{/* The Secret whose keys are the NATS credentials' environment variables ("" when NATS has none). */}}
{{- define "cosmoforge.natsSecret" -}}
{{- if .Values.nats.auth.enabled -}}
{{- if .Values.nats.auth.existingSecret -}}
{{- .Values.nats.auth.existingSecret -}}
{{- else if .Values.nats.bundled.enabled -}}
{{- include "cosmoforge.component" (dict "root" . "component" "nats-auth") -}}
{{- else -}}
{{- fail "nats.auth.existingSecret is required with an external NATS (or set nats.auth.enabled: false)" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Environment of the pods that call the dispatcher or serve it: the token, from its Secret. */}}
{{- define "cosmoforge.tokenEnv" -}}
- name: COSMOFORGE_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "cosmoforge.tokenSecret" . }}
      key: {{ .Values.auth.tokenKey }}
{{- end -}}

{{/* A Secret value kept across upgrades: the live Secret's, else a new random one. It starts
with a letter: nats-server reads the bundled server's password from the environment as a config
value, where a leading digit would make it a number. */}}
{{- define "cosmoforge.keptRandom" -}}
{{- $live := lookup "v1" "Secret" .root.Release.Namespace .name -}}
{{- if and $live $live.data (hasKey $live.data .key) -}}
{{- index $live.data .key | b64dec -}}
{{- else -}}
{{- printf "c%s" (randAlphaNum 47) -}}
{{- end -}}
{{- end -}}

{{/* Pods of this release and the runs it manages, as NetworkPolicy peers. */}}
{{- define "cosmoforge.ownPeers" -}}
- podSelector:
    matchExpressions:
      - key: app.kubernetes.io/name
        operator: In
        values: [cosmoforge, {{ include "cosmoforge.name" . | quote }}]
  {{- if .Values.operator.watch.clusterWide }}
  namespaceSelector: {}
  {{- else }}
  namespaceSelector:
    matchExpressions:
      - key: kubernetes.io/metadata.name
        operator: In
        values:
          - {{ .Release.Namespace | quote }}
          {{- range .Values.operator.watch.namespaces }}
          {{- if ne . $.Release.Namespace }}
          - {{ . | quote }}
          {{- end }}
          {{- end }}
  {{- end }}
{{- end -}}
