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
{{- with .Values.storage.endpoint }}
- name: AWS_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .Values.storage.region }}
- name: AWS_DEFAULT_REGION
  value: {{ . | quote }}
{{- end }}
{{- end -}}
