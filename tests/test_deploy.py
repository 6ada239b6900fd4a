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
    assert {"StatefulSet", "ConfigMap", "Secret", "Service", "PodMonitor"} <= kinds
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
