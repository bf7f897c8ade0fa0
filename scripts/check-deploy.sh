#!/usr/bin/env bash
# Validates what deploys Ocellus, without a Docker engine or a cluster: the Dockerfile
# (hadolint), the Kubernetes manifests (against Kubernetes' schemas, strictly), the compose
# file (the Compose specification's schema), the Prometheus config (promtool) and the
# Grafana dashboard (JSON). Tools go to target/deploy-venv on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=target/deploy-venv
if ! "$venv/bin/kubernetes-validate" --version >/dev/null 2>&1; then
  mkdir -p target
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r scripts/deploy-requirements.txt
fi
"$venv/bin/hadolint" Dockerfile
"$venv/bin/kubernetes-validate" --strict --quiet deploy/kubernetes/*.yaml
# The inference gateway: Kubernetes' own kinds as above; the InferencePool and HTTPRoute
# against their CRDs' schemas (scripts/crd_schema.py), closed to unknown fields; the endpoint
# picker's config: every plugin a profile names is declared.
gateway=deploy/kubernetes/inference-gateway
"$venv/bin/kubernetes-validate" --strict --quiet "$gateway/epp.yaml"
"$venv/bin/check-jsonschema" --schemafile "$gateway/schemas/inferencepool.json" "$gateway/inferencepool.yaml"
"$venv/bin/check-jsonschema" --schemafile "$gateway/schemas/httproute.json" "$gateway/httproute.yaml"
"$venv/bin/python" - "$gateway/epp.yaml" <<'PY'
import sys, yaml
(config_map,) = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d["kind"] == "ConfigMap"]
config = yaml.safe_load(config_map["data"]["config.yaml"])
assert config["kind"] == "EndpointPickerConfig", config
declared = {p.get("name", p["type"]) for p in config["plugins"]}
named = {r["pluginRef"] for profile in config["schedulingProfiles"] for r in profile["plugins"]}
assert named <= declared, f"profiles name undeclared plugins: {named - declared}"
PY
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
promtool check config deploy/prometheus/prometheus.yml >/dev/null
python3 -m json.tool deploy/grafana/dashboards/ocellus.json >/dev/null
echo "deploy files: valid"
