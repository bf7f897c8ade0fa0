"""A CustomResourceDefinition's schema as a JSON schema, for scripts/check-deploy.sh: the
served version's openAPIV3Schema, descriptions dropped (size), and every object that lists
its properties closed to others (`additionalProperties: false`) unless it says it keeps
unknown fields, as the API server's strict field validation refuses them.

    python3 scripts/crd_schema.py CRD.yaml VERSION OUT.json

deploy/kubernetes/inference-gateway/schemas/ came from the upstream CRDs (Apache-2.0):
kubernetes-sigs/gateway-api-inference-extension config/crd/bases/
inference.networking.k8s.io_inferencepools.yaml (v1) and kubernetes-sigs/gateway-api
config/crd/standard/gateway.networking.k8s.io_httproutes.yaml (v1).
"""

import json
import sys

import yaml


def close(node):
    if isinstance(node, dict):
        node.pop("description", None)
        for value in node.values():
            close(value)
        keeps = node.get("x-kubernetes-preserve-unknown-fields") or "additionalProperties" in node
        if node.get("type") == "object" and "properties" in node and not keeps:
            node["additionalProperties"] = False
    elif isinstance(node, list):
        for value in node:
            close(value)


crd_path, version, out = sys.argv[1:4]
crd = yaml.safe_load(open(crd_path))
(schema,) = [v["schema"]["openAPIV3Schema"] for v in crd["spec"]["versions"] if v["name"] == version]
close(schema)
# The document's own header: its group's apiVersion and its kind, exactly.
schema["properties"]["apiVersion"] = {"const": f"{crd['spec']['group']}/{version}"}
schema["properties"]["kind"] = {"const": crd["spec"]["names"]["kind"]}
schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
schema["$schema"] = "http://json-schema.org/draft-07/schema#"
json.dump(schema, open(out, "w"), separators=(",", ":"), sort_keys=True)
