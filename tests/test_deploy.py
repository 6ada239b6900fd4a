"""Deployment files validate: compose against the Compose spec, Kubernetes manifests against
the API schemas, the ConfigMap's crmstream.yaml against crmstream's own schema."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from crmstream.config import load_config

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def test_compose_file_matches_the_compose_spec():
    out = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
         str(ROOT / "docker-compose.yml")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert {"kafka", "redis", "prometheus", "grafana", "crmstream", "generator"} <= set(
        compose["services"]
    )
    assert (
        "KRaft" in (ROOT / "docker-compose.yml").read_text()
        or compose["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"
    )
    for mount in compose["services"]["grafana"]["volumes"]:
        assert (ROOT / mount.split(":")[0]).exists(), mount


def test_kubernetes_manifests_match_the_api_schemas():
    files = sorted((ROOT / "deploy" / "k8s").glob("*.yaml"))
    out = subprocess.run(
        [str(BIN / "kubernetes-validate"), "--strict", *map(str, files)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    kinds = {
        doc["kind"] for f in files for doc in yaml.safe_load_all(f.read_text()) if doc is not None
    }
    assert {"StatefulSet", "ConfigMap", "Secret", "Service", "PodMonitor", "PodDisruptionBudget",
            "PrometheusRule"} <= kinds
    (monitor,) = [
        doc
        for doc in yaml.safe_load_all((ROOT / "deploy" / "k8s" / "metrics.yaml").read_text())
        if doc["kind"] == "PodMonitor"  # a CRD: no built-in schema, so check its shape
    ]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"


def test_configmap_config_is_a_valid_crmstream_config(tmp_path):
    configmap = yaml.safe_load((ROOT / "deploy" / "k8s" / "configmap.yaml").read_text())
    text = configmap["data"]["crmstream.yaml"]
    for name in ("kafka-password", "redis-password", "pii-salt", "redis-ca.pem"):
        (tmp_path / name).write_text("s3cret-value-for-test\n")
    path = tmp_path / "crmstream.yaml"
    path.write_text(text.replace("/run/secrets/crmstream", str(tmp_path)))
    config = load_config(path, env={})
    assert config.redis.password == "s3cret-value-for-test"
    assert config.kafka.client["sasl.password"] == "s3cret-value-for-test"
    assert config.metrics.offset_by_process is False


def _docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((ROOT / "deploy" / "k8s" / name).read_text()) if d]


def _of_kind(kind: str) -> dict:
    (doc,) = [d for f in (ROOT / "deploy" / "k8s").glob("*.yaml") for d in _docs(f.name)
              if d["kind"] == kind]  # fmt: skip
    return doc


def test_the_image_caches_dependencies_apart_from_the_code():
    """One `pip wheel .` after copying every source rebuilt every dependency on any code
    change; and a HEALTHCHECK in the image marked the generator and topics containers
    (same image, no metrics) unhealthy."""
    lines = [line.strip() for line in (ROOT / "Dockerfile").read_text().splitlines()]
    steps = [line for line in lines if line and not line.startswith("#")]
    deps = next(i for i, s in enumerate(steps) if "-r requirements.txt" in s)
    first_code = next(i for i, s in enumerate(steps) if s.startswith("COPY crmstream"))
    assert deps < first_code, "dependencies must be installed before the code is copied"
    copied_before = [s for s in steps[:deps] if s.startswith("COPY")]
    assert copied_before == ["COPY pyproject.toml deploy/docker/requirements.py ./"], copied_before
    assert any("--no-deps" in s and "/wheels/app" in s for s in steps[first_code:])
    assert not any(s.startswith("HEALTHCHECK") for s in steps)
    script = ROOT / "deploy" / "docker" / "requirements.py"
    out = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml")],
                         capture_output=True, text=True, check=True)  # fmt: skip
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # with the fit extra: `crmstream fit` runs in the image
    fit = project["optional-dependencies"]["fit"]
    assert out.stdout.split() == [*project["dependencies"], *fit]


def test_only_the_flow_container_has_a_health_check_and_time_to_drain():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert "/metrics" in " ".join(compose["crmstream"]["healthcheck"]["test"])
    for name in ("topics", "generator"):
        assert "healthcheck" not in compose[name], name
    grace = compose["crmstream"]["stop_grace_period"]
    assert int(grace.rstrip("s")) > load_config(env={}).processing.drain_timeout_seconds


def test_the_statefulset_is_restricted_spread_budgeted_and_drains(tmp_path):
    service, statefulset = _docs("statefulset.yaml")[:2]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # the restricted Pod Security Standard
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    ctx = container["securityContext"]
    assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not ctx.get("privileged")
    assert all({"configMap", "secret", "emptyDir"} & set(v) for v in pod["volumes"])
    # one pod per node where possible, one voluntary disruption at a time
    term = pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
    assert term[0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    budget = _of_kind("PodDisruptionBudget")
    assert budget["spec"]["maxUnavailable"] == 1
    assert budget["spec"]["selector"] == statefulset["spec"]["selector"]
    # crmstream is PID 1 (no shell) and has time to drain
    assert "command" not in container and container["args"][container["args"].index("run") + 1:]
    drain = load_config(env={}).processing.drain_timeout_seconds
    assert pod["terminationGracePeriodSeconds"] > drain
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["CRMSTREAM_REPLICAS"]) == statefulset["spec"]["replicas"]
    assert env["CRMSTREAM_PEER_SERVICE"] == service["metadata"]["name"]


def test_the_statefulsets_own_arguments_derive_the_cluster_and_wait_for_it(tmp_path):
    """The container's args, run as pod crmstream-1 outside a cluster: -i and -a come from
    the StatefulSet, and the process waits for the peers' names, then says which did not
    resolve (it used to exit within 3 s when its own name did not resolve yet)."""
    import os

    _service, statefulset = _docs("statefulset.yaml")[:2]
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    config = tmp_path / "crmstream.yaml"
    config.write_text("kafka: {brokers: [127.0.0.1:9]}\nredis: {url: redis://127.0.0.1:9/0}\n")
    args = [str(config) if a == "/etc/crmstream/crmstream.yaml" else a for a in container["args"]]
    result = subprocess.run(
        [sys.executable, "-m", "crmstream", *args, "--peer-wait", "1"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, **env, "HOSTNAME": "crmstream-1"},
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "process 1 of 2: crmstream-0.crmstream:2101 crmstream-1.crmstream:2101" in result.stderr
    assert "still do not resolve after 1 s: crmstream-0.crmstream, crmstream-1.crmstream" in (
        result.stderr
    )


def test_the_prometheus_rule_holds_the_alert_rules():
    rule = _of_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    alerts = yaml.safe_load((ROOT / "deploy" / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"]["groups"] == alerts["groups"]
