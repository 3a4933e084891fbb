{{/* Names and labels. */}}
{{- define "ferry.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "ferry.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 53 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 53 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "ferry.meshService" -}}
{{- printf "%s-mesh" (include "ferry.fullname" .) -}}
{{- end -}}

{{- define "ferry.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ferry.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ferry.labels" -}}
{{ include "ferry.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
ferry.dev/jurisdiction: {{ include "ferry.jurisdiction" . }}
{{- end -}}

{{/* The jurisdiction, checked: two letters, upper-cased. */}}
{{- define "ferry.jurisdiction" -}}
{{- $j := required "jurisdiction is required: the ISO 3166-1 alpha-2 code of where these nodes operate (--set jurisdiction=DE)" .Values.jurisdiction | upper -}}
{{- if not (regexMatch "^[A-Z]{2}$" $j) -}}
{{- fail (printf "jurisdiction %q is not an ISO 3166-1 alpha-2 code (two letters, e.g. DE)" .Values.jurisdiction) -}}
{{- end -}}
{{- $j -}}
{{- end -}}

{{/* Bootstrap addresses: this release's first pods, then the extra ones. */}}
{{- define "ferry.bootstrap" -}}
{{- $addrs := list -}}
{{- if .Values.mesh.bootstrapSelf -}}
{{- $full := include "ferry.fullname" . -}}
{{- $svc := include "ferry.meshService" . -}}
{{- range $i := until (int (min 3 .Values.replicas)) -}}
{{- $addrs = append $addrs (printf "%s-%d.%s.%s.svc.%s:%d" $full $i $svc $.Release.Namespace $.Values.clusterDomain (int $.Values.ports.mesh)) -}}
{{- end -}}
{{- end -}}
{{- $addrs = concat $addrs .Values.mesh.bootstrap -}}
{{- join "," $addrs -}}
{{- end -}}
