{{- define "epserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "epserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "epserve.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "epserve.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{/* Labels every pod of this release carries: what the NetworkPolicy means by "the release's own pods". */}}
{{- define "epserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "epserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "epserve.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "epserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: epserve
{{- end }}

{{/* (dict "root" $ "component" "router") */}}
{{- define "epserve.componentSelector" -}}
{{ include "epserve.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "epserve.componentLabels" -}}
{{ include "epserve.labels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "epserve.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "epserve.cluster" -}}
{{ .Values.cluster | default .Release.Name }}
{{- end }}

{{/* The Secret holding the Redis URL, and its key. */}}
{{- define "epserve.redisUrlSecret" -}}
{{- if and (not .Values.redis.enabled) .Values.externalRedis.existingSecret -}}
name: {{ .Values.externalRedis.existingSecret }}
key: {{ .Values.externalRedis.existingSecretKey }}
{{- else -}}
name: {{ include "epserve.fullname" . }}
key: redis-url
{{- end }}
{{- end }}

{{- define "epserve.authEnabled" -}}
{{- if or .Values.auth.apiKeys .Values.auth.existingSecret }}true{{ end }}
{{- end }}

{{/* Pod annotations that roll the pods when the settings or secrets change. The secrets' data is made
     once per render (epserve.memo), so the checksums are of what the Secrets hold. */}}
{{- define "epserve.checksums" -}}
checksum/config: {{ include (print $.Template.BasePath "/configmap.yaml") . | sha256sum }}
checksum/secret: {{ include "epserve.secretData" . | sha256sum }}
checksum/internal-tls: {{ include "epserve.internalTlsData" . | sha256sum }}
{{- end }}

{{/* A map kept for the whole render (every template sees the same .Values): what is generated at random
     (passwords, certificates) is generated once, however many templates include it. */}}
{{- define "epserve.memo" -}}
{{- if not (hasKey .Values "epserveRenderMemo") }}{{ $_ := set .Values "epserveRenderMemo" dict }}{{ end }}
{{- end }}

{{/* The release Secret's data as JSON (secret.yaml): the built-in Redis's ACL users (services/cluster/
     redis_acl.py: one per component, `admin` for operators and probes, the default user off) and their
     passwords; an external Redis URL; API keys. A generated password is kept across upgrades by reading
     it back from the release's Secret. */}}
{{- define "epserve.secretData" -}}
{{- include "epserve.memo" . }}
{{- $memo := .Values.epserveRenderMemo }}
{{- if not (hasKey $memo "secret") }}
{{- $name := include "epserve.fullname" . }}
{{- $data := dict }}
{{- if .Values.redis.enabled }}
{{- $old := (lookup "v1" "Secret" .Release.Namespace $name).data | default dict }}
{{- $acl := list "user default off" }}
{{- range $user := list "router" "attention" "expert" "admin" }}
{{- $key := include "epserve.redisPasswordKey" $user }}
{{- $given := eq $user "admin" | ternary $.Values.redis.password "" }}
{{- $password := $given | default (get $old $key | b64dec) | default (randAlphaNum 32) }}
{{- $_ := set $data $key $password }}
{{- $rules := eq $user "admin" | ternary "~* &* +@all" (printf "~epserve:%s:* resetchannels +@all -@dangerous -scan -randomkey -dbsize" (include "epserve.cluster" $)) }}
{{- $acl = append $acl (printf "user %s on #%s %s" $user (sha256sum $password) $rules) }}
{{- end }}
{{- $_ := set $data "users.acl" (printf "%s\n" (join "\n" $acl)) }}
{{- else if not .Values.externalRedis.existingSecret }}
{{- $_ := set $data "redis-url" (required "externalRedis.url or externalRedis.existingSecret is required when redis.enabled is false" .Values.externalRedis.url) }}
{{- end }}
{{- if and .Values.auth.apiKeys (not .Values.auth.existingSecret) }}
{{- $_ := set $data "api-keys" (printf "%s\n" (join "\n" .Values.auth.apiKeys)) }}
{{- end }}
{{- $_ := set $memo "secret" $data }}
{{- end }}
{{- get $memo "secret" | toJson }}
{{- end }}

{{/* The internal plane's CA and one certificate per component as JSON (internal-tls.yaml; base64
     values), made once and kept across upgrades by reading them back; {} with internalTls off or
     existingSecrets. The CA's key is not kept: renewing means a new CA (docs/security.md). */}}
{{- define "epserve.internalTlsData" -}}
{{- include "epserve.memo" . }}
{{- $memo := .Values.epserveRenderMemo }}
{{- if not (hasKey $memo "internalTls") }}
{{- $data := dict }}
{{- if and .Values.internalTls.enabled (not .Values.internalTls.existingSecrets) }}
{{- $name := printf "%s-internal-tls" (include "epserve.fullname" .) }}
{{- $kinds := list "router" "attention" "expert" }}
{{- $data = (lookup "v1" "Secret" .Release.Namespace $name).data | default dict }}
{{- if not (hasKey $data "ca.crt") }}
{{- $ca := genCA "epserve cluster CA" (int .Values.internalTls.validityDays) }}
{{- $_ := set $data "ca.crt" ($ca.Cert | b64enc) }}
{{- range $kind := $kinds }}
{{- $identity := printf "%s.epserve.internal" $kind }}
{{- $cert := genSignedCert $identity nil (list $identity) (int $.Values.internalTls.validityDays) $ca }}
{{- $_ := set $data (printf "%s.crt" $kind) ($cert.Cert | b64enc) }}
{{- $_ := set $data (printf "%s.key" $kind) ($cert.Key | b64enc) }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ := set $memo "internalTls" $data }}
{{- end }}
{{- get $memo "internalTls" | toJson }}
{{- end }}

{{/* Environment of every epserve container: who it is, the cluster name, writable caches. */}}
{{- define "epserve.env" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_IP
  valueFrom: {fieldRef: {fieldPath: status.podIP}}
- name: EPSERVE_CLUSTER
  valueFrom: {configMapKeyRef: {name: {{ include "epserve.fullname" . }}, key: cluster}}
- name: EPSERVE_MODEL
  valueFrom: {configMapKeyRef: {name: {{ include "epserve.fullname" . }}, key: model}}
- name: HOME
  value: /cache
- name: EPSERVE_CACHE
  value: /cache/epserve
- name: TRITON_CACHE_DIR
  value: /cache/triton
{{- end }}

{{/* Placement settings of attention replicas and expert shards (they must agree). */}}
{{- define "epserve.placementEnv" -}}
- name: EPSERVE_EXPERT_SHARDS
  valueFrom: {configMapKeyRef: {name: {{ include "epserve.fullname" . }}, key: expert-shards}}
- name: EPSERVE_REDUNDANT_EXPERTS
  valueFrom: {configMapKeyRef: {name: {{ include "epserve.fullname" . }}, key: redundant-experts}}
{{- end }}

{{/* `serve KIND` and the flags every service takes: (dict "kind" "router" "port" 50051) */}}
{{- define "epserve.serveArgs" -}}
- serve
- {{ .kind }}
- --cluster=$(EPSERVE_CLUSTER)
- --model=$(EPSERVE_MODEL)
- --host=0.0.0.0
- --port={{ .port }}
- --advertise-host=$(POD_IP)
{{- if .metrics.enabled }}
- --metrics-port={{ .metrics.port }}
{{- end }}
{{- end }}

{{/* A service's `settings` as its flags: camelCase name -> --kebab-case=value; booleans --name / --no-name;
     whole numbers without an exponent (YAML numbers reach templates as float64). */}}
{{- define "epserve.settingsArgs" -}}
{{- range $name, $value := . }}
{{- if kindIs "bool" $value }}
- --{{ if not $value }}no-{{ end }}{{ kebabcase $name }}
{{- else if and (kindIs "float64" $value) (eq $value (floor $value)) }}
- --{{ kebabcase $name }}={{ int64 $value }}
{{- else }}
- --{{ kebabcase $name }}={{ $value }}
{{- end }}
{{- end }}
{{- end }}

{{/* Flags of the services that load weights: (dict "root" $ "gpus" N) */}}
{{- define "epserve.modelArgs" -}}
- --expert-shards=$(EPSERVE_EXPERT_SHARDS)
- --redundant-experts=$(EPSERVE_REDUNDANT_EXPERTS)
- --device={{ if gt (int .gpus) 0 }}cuda{{ else }}cpu{{ end }}
{{- with .root.Values.model.dtype }}
- --dtype={{ . }}
{{- end }}
{{- if .root.Values.placement.loadProfile }}
- --load-profile=/etc/epserve/config/load-profile.json
{{- end }}
{{- end }}

{{/* Startup, readiness and liveness probes on grpc.health.v1 at `port`: (dict "port" P "startup" .Values.x.startupProbe "tcp" false)
     Kubelet's gRPC probes speak plaintext only, so a TLS port gets TCP probes instead. */}}
{{- define "epserve.probes" -}}
{{- $check := ternary (dict "tcpSocket" (dict "port" .port)) (dict "grpc" (dict "port" .port "service" "")) (eq .tcp true) -}}
startupProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 10
  failureThreshold: {{ .startup.failureThreshold }}
readinessProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 5
  timeoutSeconds: 3
  failureThreshold: 2
livenessProbe:
  {{- toYaml $check | nindent 2 }}
  periodSeconds: 10
  timeoutSeconds: 5
  failureThreshold: 6
{{- end }}

{{/* Waits for Redis before the service starts (services exit when Redis does not answer), logged in
     as the component's user: (dict "root" $ "component" "router") */}}
{{- define "epserve.waitForRedis" -}}
{{- $root := .root }}
- name: wait-for-redis
  image: {{ $root.Values.redis.image.repository }}:{{ $root.Values.redis.image.tag }}
  imagePullPolicy: {{ $root.Values.redis.image.pullPolicy }}
  command: [sh, -c, 'until redis-cli -u "$EPSERVE_REDIS_URL" ping | grep -q PONG; do echo waiting for redis; sleep 2; done']
  env:
    {{- include "epserve.redisEnv" . | nindent 4 }}
    {{- if $root.Values.redis.enabled }}
    - name: REDISCLI_AUTH
      valueFrom: {secretKeyRef: {name: {{ include "epserve.fullname" $root }}, key: {{ include "epserve.redisPasswordKey" .component }}}}
    {{- end }}
  securityContext:
    {{- toYaml $root.Values.securityContext | nindent 4 }}
  resources:
    requests: {cpu: 10m, memory: 16Mi}
    limits: {memory: 64Mi}
{{- end }}

{{/* Mounts every epserve container has: writable caches, /tmp, the checkpoint, the placement profile. */}}
{{- define "epserve.volumeMounts" -}}
- {name: cache, mountPath: /cache}
- {name: tmp, mountPath: /tmp}
{{- if or .Values.model.persistentVolumeClaim.claimName .Values.model.hostPath.path }}
- {name: model, mountPath: {{ .Values.model.mountPath }}, readOnly: true}
{{- end }}
{{- if .Values.placement.loadProfile }}
- {name: config, mountPath: /etc/epserve/config, readOnly: true}
{{- end }}
{{- end }}

{{- define "epserve.volumes" -}}
- {name: cache, emptyDir: {}}
- {name: tmp, emptyDir: {}}
{{- if .Values.model.persistentVolumeClaim.claimName }}
- name: model
  persistentVolumeClaim: {claimName: {{ .Values.model.persistentVolumeClaim.claimName }}, readOnly: true}
{{- else if .Values.model.hostPath.path }}
- name: model
  hostPath: {path: {{ .Values.model.hostPath.path }}, type: Directory}
{{- end }}
{{- if .Values.placement.loadProfile }}
- name: config
  configMap:
    name: {{ include "epserve.fullname" . }}
    items: [{key: load-profile.json, path: load-profile.json}]
{{- end }}
{{- end }}

{{/* Resources with `gpus` nvidia.com/gpu added to requests and limits: (dict "resources" R "gpus" N) */}}
{{- define "epserve.resources" -}}
{{- $r := deepCopy (.resources | default dict) }}
{{- if gt (int .gpus) 0 }}
{{- $_ := set $r "limits" (merge (dict "nvidia.com/gpu" (toString (int .gpus))) ($r.limits | default dict)) }}
{{- $_ := set $r "requests" (merge (dict "nvidia.com/gpu" (toString (int .gpus))) ($r.requests | default dict)) }}
{{- end }}
{{- toYaml $r }}
{{- end }}

{{/* NetworkPolicy ingress rule opening the metrics port when the ServiceMonitor is on. */}}
{{- define "epserve.metricsIngress" -}}
- ports:
    - {port: {{ .Values.serviceMonitor.port }}, protocol: TCP}
{{- end }}

{{/* A NetworkPolicy peer: the release's pods of one component: (dict "root" $ "component" "attention") */}}
{{- define "epserve.podPeer" -}}
- podSelector:
    matchLabels:
      {{- include "epserve.componentSelector" . | nindent 6 }}
{{- end }}

{{/* The Secret key of a Redis ACL user's password: "router" -> redis-password-router; "admin" -> redis-password. */}}
{{- define "epserve.redisPasswordKey" -}}
redis-password{{ if ne . "admin" }}-{{ . }}{{ end }}
{{- end }}

{{/* Where a component's Redis is: the built-in one's URL names the component's ACL user and no password
     (that is in a file: epserve.redisArgs); an external one's URL comes from its Secret. Never in argv.
     (dict "root" $ "component" "router") */}}
{{- define "epserve.redisEnv" -}}
- name: EPSERVE_REDIS_URL
{{- if .root.Values.redis.enabled }}
  value: redis://{{ .component }}@{{ include "epserve.fullname" .root }}-redis:{{ .root.Values.redis.port }}/0
{{- else }}
  valueFrom:
    secretKeyRef:
      {{- include "epserve.redisUrlSecret" .root | nindent 6 }}
{{- end }}
{{- end }}

{{- define "epserve.redisPasswordDir" -}}
/etc/epserve/redis
{{- end }}

{{/* The flag naming the file with the component's Redis password (built-in Redis). */}}
{{- define "epserve.redisArgs" -}}
{{- if .Values.redis.enabled }}
- --redis-password-file={{ include "epserve.redisPasswordDir" . }}/password
{{- end }}
{{- end }}

{{- define "epserve.redisMount" -}}
{{- if .Values.redis.enabled }}
- {name: redis-password, mountPath: {{ include "epserve.redisPasswordDir" . }}, readOnly: true}
{{- end }}
{{- end }}

{{/* The component's Redis password as a file readable by the pod's group (fsGroup): (dict "root" $ "component" "router") */}}
{{- define "epserve.redisVolume" -}}
{{- if .root.Values.redis.enabled }}
- name: redis-password
  secret:
    secretName: {{ include "epserve.fullname" .root }}
    defaultMode: 0440
    items: [{key: {{ include "epserve.redisPasswordKey" .component }}, path: password}]
{{- end }}
{{- end }}

{{/* Mutual TLS on the internal plane: the component's CA, certificate and key as files. */}}
{{- define "epserve.internalTlsDir" -}}
/etc/epserve/internal-tls
{{- end }}

{{- define "epserve.internalTlsArgs" -}}
{{- if .Values.internalTls.enabled }}
- --cluster-ca={{ include "epserve.internalTlsDir" . }}/ca.crt
- --cluster-cert={{ include "epserve.internalTlsDir" . }}/tls.crt
- --cluster-key={{ include "epserve.internalTlsDir" . }}/tls.key
{{- end }}
{{- end }}

{{- define "epserve.internalTlsMount" -}}
{{- if .Values.internalTls.enabled }}
- {name: internal-tls, mountPath: {{ include "epserve.internalTlsDir" . }}, readOnly: true}
{{- end }}
{{- end }}

{{/* (dict "root" $ "component" "router"): the component's kubernetes.io/tls Secret, or its files in the
     chart's internal-tls Secret. */}}
{{- define "epserve.internalTlsVolume" -}}
{{- $tls := .root.Values.internalTls }}
{{- if $tls.enabled }}
- name: internal-tls
  secret:
    {{- if $tls.existingSecrets }}
    secretName: {{ get $tls.existingSecrets .component }}
    items: [{key: ca.crt, path: ca.crt}, {key: tls.crt, path: tls.crt}, {key: tls.key, path: tls.key}]
    {{- else }}
    secretName: {{ include "epserve.fullname" .root }}-internal-tls
    items: [{key: ca.crt, path: ca.crt}, {key: {{ .component }}.crt, path: tls.crt}, {key: {{ .component }}.key, path: tls.key}]
    {{- end }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{/* The port kubelet probes an internal service on: its plaintext health port under mutual TLS. */}}
{{- define "epserve.probePort" -}}
{{- if .root.Values.internalTls.enabled }}{{ .root.Values.internalTls.healthPort }}{{ else }}{{ .port }}{{ end }}
{{- end }}
