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
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml
promtool check config deploy/prometheus/prometheus.yml >/dev/null
python3 -m json.tool deploy/grafana/dashboards/ocellus.json >/dev/null
echo "deploy files: valid"
