{{/* The chart name, overridable. */}}
{{- define "meshlet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Resource names: the release name when it already says meshlet, else <release>-meshlet. */}}
{{- define "meshlet.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := include "meshlet.name" . }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "meshlet.injector" -}}
{{- printf "%s-injector" (include "meshlet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meshlet.proxy" -}}
{{- printf "%s-proxy" (include "meshlet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "meshlet.tlsSecret" -}}
{{- if eq .Values.webhook.certs.source "secret" }}
{{- required "webhook.certs.secretName is required when webhook.certs.source is secret" .Values.webhook.certs.secretName }}
{{- else }}
{{- printf "%s-tls" (include "meshlet.injector" .) }}
{{- end }}
{{- end }}

{{/* Labels on every resource. */}}
{{- define "meshlet.labels" -}}
app.kubernetes.io/name: {{ include "meshlet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The injector's pod selector. */}}
{{- define "meshlet.injectorSelector" -}}
app.kubernetes.io/name: {{ include "meshlet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: injector
{{- end }}

{{- define "meshlet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "meshlet.initImage" -}}
{{- printf "%s:%s" .Values.initImage.repository (default .Chart.AppVersion .Values.initImage.tag) }}
{{- end }}

{{/* Refuses value combinations the cluster cannot run, naming the value to change. */}}
{{- define "meshlet.validate" -}}
{{- if and .Values.proxy.nativeSidecars (semverCompare "<1.29.0-0" .Capabilities.KubeVersion.Version) }}
{{- fail (printf "proxy.nativeSidecars=true needs Kubernetes 1.29 or later (native sidecars); this cluster is %s: set proxy.nativeSidecars=false" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- end }}

{{- define "meshlet.identity" -}}
{{- printf "%s-identity" (include "meshlet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The identity service's pod selector. */}}
{{- define "meshlet.identitySelector" -}}
app.kubernetes.io/name: {{ include "meshlet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: identity
{{- end }}

{{/* The issuer Secret the identity service reads. */}}
{{- define "meshlet.identityIssuer" -}}
{{- if eq .Values.identity.issuer.source "secret" }}
{{- required "identity.issuer.secretName is required when identity.issuer.source is secret" .Values.identity.issuer.secretName }}
{{- else }}
{{- printf "%s-issuer" (include "meshlet.identity" .) }}
{{- end }}
{{- end }}
