"""What schemas cannot check in deploy/: the manifests agree with each other, with golem's config
and with golem's code (docs/deploy.md).

- timing: terminationGracePeriodSeconds >= preStop sleep + limits.shutdownGraceMs + the gateway's
  fixed tail (closing politely, stopping the sidecar; read from src/) + a margin; the startup probe
  outlasts sidecar.startTimeoutMs; Envoy's health checks see NOT_SERVING inside the drain;
- names and ports: probes, Services, PDB, InferencePool and Envoy point at the pod's gRPC port, its
  labels, the exam service's health name and the routing header as src/wire.ts spells them;
- the ConfigMap's config loads through both of golem's loaders (the gateway's zod schema through
  dist/, the sidecar's parse_config) and its defaults lie inside its roots;
- envoy-local.yaml is envoy.yaml apart from its addresses.

Usage: .venv/bin/python scripts/check_deploy.py check
       .venv/bin/python scripts/check_deploy.py render-gpu   (the GPU overlay, as YAML, on stdout)
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(ROOT / "inference_py"))
from golem_sidecar.config import parse_config  # noqa: E402

# Kubelet's own latency and a last log flush; below this a pod could be killed mid-exit.
MIN_MARGIN_S = 2.0
RETRIED_METHODS = {"TakeExam", "StreamExam", "CompareAdapters", "ListAdapters"}

Manifest = dict[str, Any]


def source_constant(relative: str, name: str) -> str:
    """A constant's literal as written in golem's source, so the check follows the code."""
    text = (ROOT / relative).read_text(encoding="utf-8")
    match = re.search(rf"\b{name}\s*=\s*(['\"]?)([^'\";]+)\1;", text)
    if not match:
        raise SystemExit(f"check_deploy: {name} not found in {relative}")
    return match.group(2)


def load_kustomization(folder: Path) -> list[Manifest]:
    """Renders a kustomization that uses only resources, namespace and JSON 6902 patches."""
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text(encoding="utf-8"))
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources", "namespace", "patches"}
    if unsupported:
        raise SystemExit(f"check_deploy: {folder}: cannot render {sorted(unsupported)}")
    manifests: list[Manifest] = []
    for resource in kustomization["resources"]:
        path = folder / resource
        if path.is_dir():
            manifests += load_kustomization(path)
        else:
            manifests += [m for m in yaml.safe_load_all(path.read_text(encoding="utf-8")) if m]
    for manifest in manifests:
        if "namespace" in kustomization:
            manifest["metadata"]["namespace"] = kustomization["namespace"]
    for patch in kustomization.get("patches", []):
        target = patch["target"]
        matches = [
            m
            for m in manifests
            if m["kind"] == target["kind"] and m["metadata"]["name"] == target["name"]
        ]
        if len(matches) != 1:
            raise SystemExit(
                f"check_deploy: {folder}: patch target {target} matches {len(matches)}"
            )
        for operation in yaml.safe_load(patch["patch"]):
            apply_json_patch(matches[0], operation)
    return manifests


def apply_json_patch(document: Manifest, operation: dict[str, Any]) -> None:
    """RFC 6902 add and replace, the two operations the overlays use."""
    keys = [k.replace("~1", "/").replace("~0", "~") for k in operation["path"].split("/")[1:]]
    parent: Any = document
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last, op, value = keys[-1], operation["op"], copy.deepcopy(operation["value"])
    if op not in ("add", "replace"):
        raise SystemExit(f"check_deploy: JSON patch op {op!r} is not supported here")
    if isinstance(parent, list):
        if last == "-":
            parent.append(value)
        elif op == "add":
            parent.insert(int(last), value)
        else:
            parent[int(last)] = value
    elif op == "replace" and last not in parent:
        raise SystemExit(f"check_deploy: replace of missing {operation['path']}")
    else:
        parent[last] = value


def one(manifests: list[Manifest], kind: str, name: str) -> Manifest:
    found = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


class Checks:
    """Collects failures; each check says what it compared, with the numbers."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def expect(self, ok: bool, what: str) -> None:
        print(f"{'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            self.failures.append(what)


def golem_config(manifests: list[Manifest]) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(
        one(manifests, "ConfigMap", "golem-config")["data"]["golem.json"]
    )
    return config


def container_env(container: Manifest) -> dict[str, str]:
    """The container's literal environment values (those from Secrets or fields left out)."""
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def check_pod(checks: Checks, manifests: list[Manifest], variant: str) -> None:
    deployment = one(manifests, "Deployment", "golem")
    pod = deployment["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = container_env(container)
    config = golem_config(manifests)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    grace_ms = int(env.get("GOLEM_SHUTDOWN_GRACE_MS", config["limits"]["shutdownGraceMs"]))

    # Shutdown: everything from the pod's deletion to golem's exit fits in the grace period.
    pre_stop = pod_pre_stop_seconds(container)
    close_politely = int(source_constant("src/gateway/server.ts", "CLOSE_POLITELY_MS")) / 1000
    sidecar_stop = int(source_constant("src/sidecar/supervisor.ts", "SIDECAR_STOP_GRACE_MS")) / 1000
    needed = pre_stop + grace_ms / 1000 + close_politely + sidecar_stop + MIN_MARGIN_S
    period = pod["terminationGracePeriodSeconds"]
    checks.expect(
        period >= needed,
        f"{variant}: terminationGracePeriodSeconds {period} >= preStop {pre_stop}"
        f" + shutdownGraceMs {grace_ms / 1000} + close {close_politely}"
        f" + sidecar stop {sidecar_stop} + margin {MIN_MARGIN_S} = {needed}",
    )
    startup = container["startupProbe"]
    window = startup["periodSeconds"] * startup["failureThreshold"]
    start_s = config["sidecar"]["startTimeoutMs"] / 1000
    checks.expect(
        window >= start_s,
        f"{variant}: startup probe window {window} s >= startTimeoutMs {start_s} s",
    )

    # Probes: the gRPC port, "" for start-up, the gateway's own name for liveness, the exam
    # service for readiness.
    exam_service = source_constant("src/wire.ts", "EXAM_SERVICE_NAME")
    liveness = source_constant("src/wire.ts", "LIVENESS_SERVICE_NAME")
    for probe, service in (
        ("startupProbe", ""),
        ("livenessProbe", liveness),
        ("readinessProbe", exam_service),
    ):
        grpc = container[probe]["grpc"]
        checks.expect(
            grpc["port"] == ports["grpc"] and grpc.get("service", "") == service,
            f"{variant}: {probe} is gRPC on port {grpc['port']}, service {grpc.get('service')!r}",
        )
    host, _, port = config["listen"].rpartition(":")
    checks.expect(
        host == "0.0.0.0" and int(port) == ports["grpc"],
        f"{variant}: config listen {config['listen']} is the container's grpc port {ports['grpc']}",
    )
    if "metrics" in config:
        metrics_port = int(config["metrics"]["listen"].rpartition(":")[2])
        checks.expect(
            metrics_port == ports["metrics"],
            f"{variant}: metrics.listen port {metrics_port} is the container's metrics port",
        )

    # The token: from a Secret, under the name the config reads.
    token_env = [e for e in container["env"] if e["name"] == config["security"]["authTokenEnv"]]
    checks.expect(
        len(token_env) == 1 and "secretKeyRef" in token_env[0].get("valueFrom", {}),
        f"{variant}: {config['security']['authTokenEnv']} comes from a Secret",
    )
    # A read-only root: /tmp (the sidecar's socket, caches) must be a writable volume.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    checks.expect(
        container["securityContext"]["readOnlyRootFilesystem"]
        and "emptyDir" in volumes[mounts["/tmp"]]
        and env.get("HOME", "").startswith("/tmp"),
        f"{variant}: read-only root file system, /tmp an emptyDir, HOME under /tmp",
    )
    check_config_loads(checks, config, env, variant)


def pod_pre_stop_seconds(container: Manifest) -> float:
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", f"preStop {command}: only a sleep can be timed here"
    return float(command[1])


def check_config_loads(
    checks: Checks, config: dict[str, Any], env: dict[str, str], variant: str
) -> None:
    """The ConfigMap's config with the container's GOLEM_* values through the gateway's loader,
    then what it resolves to through the sidecar's (as the gateway hands it on)."""
    overrides = {k: v for k, v in env.items() if k.startswith("GOLEM_") and k != "GOLEM_CONFIG"}
    script = (
        "const {loadConfig} = require('./dist/config.js');"
        "const c = loadConfig({file: '/dev/stdin', env: JSON.parse(process.argv[1])});"
        "process.stdout.write(JSON.stringify(c));"
    )
    result = subprocess.run(
        ["node", "-e", script, json.dumps(overrides)],
        input=json.dumps(config),
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    checks.expect(
        result.returncode == 0,
        f"{variant}: the gateway's loader takes it with {sorted(overrides) or 'no overrides'}"
        + (f": {result.stderr.strip()}" if result.returncode else ""),
    )
    if result.returncode:
        return
    # The gateway spawns its sidecar on a private Unix socket (src/sidecar/supervisor.ts), which
    # is where the pod's sidecar listens, whatever the gateway's own address.
    sidecar = parse_config(json.loads(result.stdout), "unix:/tmp/golem-pod/sidecar.sock")
    roots = sidecar.security
    inside = (
        any(Path(sidecar.defaults.model_name).is_relative_to(r) for r in roots.model_roots)
        and any(Path(sidecar.defaults.adapter_path).is_relative_to(r) for r in roots.adapter_roots)
        and all(r.is_absolute() for r in roots.exam_roots)
    )
    checks.expect(
        inside,
        f"{variant}: the sidecar's loader takes it (device {sidecar.defaults.device}); "
        "the default model and adapter lie inside the roots",
    )


def check_services(checks: Checks, manifests: list[Manifest]) -> None:
    pod = one(manifests, "Deployment", "golem")["spec"]["template"]
    labels = pod["metadata"]["labels"]
    port_names = {p["name"] for p in pod["spec"]["containers"][0]["ports"]}
    for service in (m for m in manifests if m["kind"] == "Service"):
        name = service["metadata"]["name"]
        grpc = [p for p in service["spec"]["ports"] if p["name"] == "grpc"]
        checks.expect(
            service["spec"]["selector"].items() <= labels.items()
            and all(p["targetPort"] in port_names for p in service["spec"]["ports"])
            and len(grpc) == 1
            and grpc[0]["appProtocol"] == "kubernetes.io/h2c",
            f"Service {name}: selects the pods, names their ports, grpc is kubernetes.io/h2c",
        )
    pdb = one(manifests, "PodDisruptionBudget", "golem")
    checks.expect(
        pdb["spec"]["selector"]["matchLabels"].items() <= labels.items(),
        "PodDisruptionBudget selects the pods",
    )
    pool = yaml.safe_load((DEPLOY / "inference-pool/inference-pool.yaml").read_text("utf-8"))
    grpc_port = one(manifests, "Service", "golem")["spec"]["ports"][0]["port"]
    checks.expect(
        pool["spec"]["selector"]["matchLabels"] == pdb["spec"]["selector"]["matchLabels"]
        and [p["number"] for p in pool["spec"]["targetPorts"]] == [grpc_port]
        and pool["metadata"]["namespace"] == pdb["metadata"]["namespace"],
        f"InferencePool selects the pods in their namespace, target port {grpc_port}",
    )


def check_envoy(checks: Checks, manifests: list[Manifest]) -> None:
    envoy = yaml.safe_load((DEPLOY / "envoy/envoy.yaml").read_text("utf-8"))
    local = yaml.safe_load((DEPLOY / "envoy/envoy-local.yaml").read_text("utf-8"))
    cluster = envoy["static_resources"]["clusters"][0]
    headless = one(manifests, "Service", "golem-headless")
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    expected = f"golem-headless.{headless['metadata']['namespace']}.svc.cluster.local"
    checks.expect(
        address["socket_address"]["address"] == expected
        and address["socket_address"]["port_value"] == headless["spec"]["ports"][0]["port"]
        and cluster["cluster_type"]["typed_config"]["all_addresses_in_single_endpoint"] is False,
        f"envoy.yaml: strict DNS on {expected}:{address['socket_address']['port_value']}",
    )
    health = cluster["health_checks"][0]
    exam_service = source_constant("src/wire.ts", "EXAM_SERVICE_NAME")
    detect_s = seconds(health["interval"]) * health["unhealthy_threshold"]
    grace_s = golem_config(manifests)["limits"]["shutdownGraceMs"] / 1000
    checks.expect(
        health["grpc_health_check"]["service_name"] == exam_service and detect_s < grace_s,
        f"envoy.yaml: gRPC health checks on {exam_service} see NOT_SERVING in {detect_s} s,"
        f" inside the {grace_s} s drain",
    )
    routes = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    methods = set(
        re.findall(
            r"^\s*rpc (\w+)\(", (ROOT / "proto/golem/exam/v1/exam.proto").read_text("utf-8"), re.M
        )
    )
    retried = {
        r["match"]["path"].rsplit("/", 1)[1]
        for r in routes
        if "retry_policy" in r["route"] and "path" in r["match"]
    }
    header = source_constant("src/wire.ts", "ADAPTER_ROUTING_KEY")
    checks.expect(
        retried == RETRIED_METHODS
        and retried <= methods
        and all("retry_policy" not in r["route"] for r in routes if "prefix" in r["match"])
        and all(r["route"]["hash_policy"][0]["header"]["header_name"] == header for r in routes)
        and cluster["lb_policy"] in ("RING_HASH", "MAGLEV"),
        f"envoy.yaml: {cluster['lb_policy']} on {header}; retries only for {sorted(retried)}",
    )
    checks.expect(
        strip_addresses(envoy) == strip_addresses(local),
        "envoy-local.yaml is envoy.yaml but for the listener address, cluster type and endpoints",
    )


def seconds(duration: str) -> float:
    assert duration.endswith("s"), duration
    return float(duration[:-1])


def strip_addresses(envoy: Manifest) -> Manifest:
    envoy = copy.deepcopy(envoy)
    del envoy["static_resources"]["listeners"][0]["address"]
    cluster = envoy["static_resources"]["clusters"][0]
    for key in ("type", "cluster_type", "load_assignment"):
        cluster.pop(key, None)
    return envoy


def check_kubectl_agrees(checks: Checks, rendered: list[Manifest]) -> None:
    """Where kubectl is installed (it is not part of `make setup`), its kustomize must agree."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        print(
            "skip kubectl kustomize not installed: the GPU overlay is rendered by this script only"
        )
        return
    output = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "overlays/gpu")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    by_name = {(m["kind"], m["metadata"]["name"]): m for m in yaml.safe_load_all(output) if m}
    checks.expect(
        by_name == {(m["kind"], m["metadata"]["name"]): m for m in rendered},
        "kubectl kustomize renders the GPU overlay as this script does",
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["check", "render-gpu"])
    args = parser.parse_args()
    base = load_kustomization(DEPLOY / "base")
    gpu = load_kustomization(DEPLOY / "overlays/gpu")
    if args.command == "render-gpu":
        yaml.safe_dump_all(gpu, sys.stdout, sort_keys=False)
        return 0
    checks = Checks()
    check_pod(checks, base, "base")
    check_pod(checks, gpu, "gpu overlay")
    check_services(checks, base)
    check_envoy(checks, base)
    check_kubectl_agrees(checks, gpu)
    if checks.failures:
        print(f"check_deploy: {len(checks.failures)} check(s) failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
