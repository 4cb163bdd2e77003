{{- define "tcpstate.name" -}}
{{- .Chart.Name -}}
{{- end -}}

{{- define "tcpstate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tcpstate.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tcpstate.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tcpstate.labels" -}}
{{ include "tcpstate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The scrape's relabelling: keep the workloads' namespace, pod and container labels
(served under groupBy) and name the exporter's own pod, namespace and node apart. */}}
{{- define "tcpstate.relabelings" -}}
- sourceLabels: [__meta_kubernetes_pod_name]
  targetLabel: exporter_pod
- sourceLabels: [__meta_kubernetes_namespace]
  targetLabel: exporter_namespace
- sourceLabels: [__meta_kubernetes_pod_node_name]
  targetLabel: node
- action: labeldrop
  regex: (pod|container|namespace)
{{- end -}}

{{- define "tcpstate.endpoint" -}}
port: metrics
path: /metrics
interval: {{ .interval }}
scrapeTimeout: {{ .scrapeTimeout }}
honorLabels: true
{{- end -}}
