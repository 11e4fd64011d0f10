{{/* Names and labels shared by every resource. */}}
{{- define "sluice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sluice.labels" -}}
app.kubernetes.io/name: sluice
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* Selector labels of one component; call with (dict "root" $ "component" "gateway"). */}}
{{- define "sluice.selector" -}}
app.kubernetes.io/name: sluice
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "sluice.image" -}}
{{- $tag := .image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s:%s" .image.repository $tag -}}
{{- end -}}

{{- define "sluice.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-keys" (include "sluice.fullname" .)) -}}
{{- end -}}

{{- define "sluice.kafkaSecretName" -}}
{{- .Values.kafka.security.existingSecret | default (printf "%s-kafka" (include "sluice.fullname" .)) -}}
{{- end -}}

{{- define "sluice.kafkaUsesSasl" -}}
{{- if hasPrefix "SASL" .Values.kafka.security.protocol }}true{{ end -}}
{{- end -}}

{{- define "sluice.kafkaUsesTls" -}}
{{- if has .Values.kafka.security.protocol (list "SSL" "SASL_SSL") }}true{{ end -}}
{{- end -}}

{{/* The Kafka Secret holds ca.crt: given as a value, or declared for an existingSecret. */}}
{{- define "sluice.kafkaHasCa" -}}
{{- with .Values.kafka.security }}
{{- if and (include "sluice.kafkaUsesTls" $) (or .tls.caCert (and .existingSecret .tls.secretHasCa)) }}true{{ end -}}
{{- end }}
{{- end -}}

{{/* The Kafka Secret holds tls.crt and tls.key (mutual TLS). */}}
{{- define "sluice.kafkaHasClientCert" -}}
{{- with .Values.kafka.security }}
{{- if and (include "sluice.kafkaUsesTls" $) (or .tls.clientCert (and .existingSecret .tls.secretHasClientCert)) }}true{{ end -}}
{{- end }}
{{- end -}}

{{/* Environment every Sluice container gets: config map, master keys, Kafka credentials. */}}
{{- define "sluice.env" -}}
- name: SLUICE_REDACTION_MASTER_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "sluice.secretName" . }}, key: redaction-master-key}
- name: SLUICE_AUDIT_MASTER_KEY
  valueFrom:
    secretKeyRef: {name: {{ include "sluice.secretName" . }}, key: audit-master-key}
{{- include "sluice.kafkaSecretEnv" . }}
{{- end -}}

{{/* How the services reach Kafka (sluice/kafka_security.py): SLUICE_* name -> value. */}}
{{- define "sluice.kafkaSettings" -}}
SLUICE_KAFKA_BOOTSTRAP: {{ required "kafka.bootstrap is required" .Values.kafka.bootstrap | quote }}
SLUICE_KAFKA_SECURITY_PROTOCOL: {{ .Values.kafka.security.protocol | quote }}
{{- if include "sluice.kafkaUsesSasl" . }}
SLUICE_KAFKA_SASL_MECHANISM: {{ .Values.kafka.security.sasl.mechanism | quote }}
{{- end }}
{{- if include "sluice.kafkaUsesTls" . }}
SLUICE_KAFKA_SSL_CHECK_HOSTNAME: {{ .Values.kafka.security.tls.checkHostname | quote }}
{{- end }}
{{- if include "sluice.kafkaHasCa" . }}
SLUICE_KAFKA_SSL_CA_FILE: /etc/sluice/kafka-tls/ca.crt
{{- end }}
{{- if include "sluice.kafkaHasClientCert" . }}
SLUICE_KAFKA_SSL_CERT_FILE: /etc/sluice/kafka-tls/tls.crt
SLUICE_KAFKA_SSL_KEY_FILE: /etc/sluice/kafka-tls/tls.key
{{- end }}
{{- end -}}

{{/* The SASL login, from the Kafka Secret. */}}
{{- define "sluice.kafkaSecretEnv" -}}
{{- if include "sluice.kafkaUsesSasl" . }}
- name: SLUICE_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ include "sluice.kafkaSecretName" . }}, key: sasl-username}
- name: SLUICE_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ include "sluice.kafkaSecretName" . }}, key: sasl-password}
{{- end }}
{{- end -}}

{{/* Kafka TLS material as files, mounted at /etc/sluice/kafka-tls. */}}
{{- define "sluice.kafkaTlsVolume" -}}
{{- if include "sluice.kafkaUsesTls" . }}
- name: kafka-tls
  secret:
    secretName: {{ include "sluice.kafkaSecretName" . }}
    optional: true
{{- end }}
{{- end -}}

{{- define "sluice.kafkaTlsMount" -}}
{{- if include "sluice.kafkaUsesTls" . }}
- name: kafka-tls
  mountPath: /etc/sluice/kafka-tls
  readOnly: true
{{- end }}
{{- end -}}

{{/* The topic plan, parsed from the copy of schemas/topics.yaml in files/. */}}
{{- define "sluice.topicPlan" -}}
{{- .Files.Get "files/topics.yaml" -}}
{{- end -}}
