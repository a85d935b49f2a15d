#!/usr/bin/env bash
# Offline checks of deploy/ (docs/deploy.md), run by `make test` through `make validate-deploy`:
# the Kubernetes manifests (base and the rendered GPU overlay) against the schemas bundled in
# kubernetes-validate, strictly; the InferencePool against its hand-written JSON Schema; both Envoy
# configs through Envoy itself; then scripts/check_deploy.py (timing, names and ports between them).
# Needs only what `make setup` installs: .venv (kubernetes-validate, check-jsonschema, envoy) and dist/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
# 1.30: the oldest Kubernetes these manifests need (the preStop sleep action); 1.37: the newest
# schemas kubernetes-validate bundles.
K8S_VERSIONS=(1.30.0 1.37.0)

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

"$VENV/bin/python" scripts/check_deploy.py render-gpu >"$tmp/gpu-overlay.yaml"
manifests=(deploy/base/configmap.yaml deploy/base/deployment.yaml deploy/base/service.yaml
	deploy/base/pdb.yaml "$tmp/gpu-overlay.yaml")
for version in "${K8S_VERSIONS[@]}"; do
	echo "== kubernetes-validate --strict -k $version"
	"$VENV/bin/kubernetes-validate" --strict --kubernetes-version "$version" "${manifests[@]}" |
		sed "s|$tmp/gpu-overlay.yaml|deploy/overlays/gpu (rendered)|"
done

echo "== check-jsonschema: InferencePool against the hand-written v1 schema"
"$VENV/bin/check-jsonschema" --schemafile deploy/inference-pool/inferencepool-v1.schema.json \
	deploy/inference-pool/inference-pool.yaml

echo "== envoy --mode validate"
for config in deploy/envoy/envoy.yaml deploy/envoy/envoy-local.yaml; do
	if ! out=$("$VENV/bin/envoy" --mode validate --disable-hot-restart -c "$config" 2>&1); then
		echo "$out" >&2
		exit 1
	fi
	# A deprecated field validates today and breaks on a later Envoy: refuse it now.
	if grep -q 'Deprecated field' <<<"$out"; then
		grep 'Deprecated field' <<<"$out" >&2
		echo "$config: uses deprecated Envoy fields" >&2
		exit 1
	fi
	tail -n 1 <<<"$out"
done

echo "== scripts/check_deploy.py"
"$VENV/bin/python" scripts/check_deploy.py check
