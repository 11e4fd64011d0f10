"""The Helm chart: lints, renders and validates (kubeconform) on both value sets, and
renders what the architecture needs for every service and every topic."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from sluice import kafka_security
from sluice.config import REPO_ROOT, SERVICES, Settings, load_settings
from tests.ops.conftest import CHART, KUBE_VERSION, VALUE_SETS, Render, of_kind, run
from tests.tls_material import make_tls_material

# The first run builds the Go tools (go install; minutes on a busy machine): allow for it.
pytestmark = pytest.mark.timeout(3600)
# Custom resources: kubeconform has no schema for them offline; their shape is tested below.
CRD_KINDS = ("ScaledObject", "TriggerAuthentication", "KafkaTopic", "ServiceMonitor", "PrometheusRule")
PLAN = yaml.safe_load((REPO_ROOT / "schemas" / "topics.yaml").read_text())
PRODUCTION = VALUE_SETS["production"]


def _workloads(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {**of_kind(docs, "Deployment"), **of_kind(docs, "StatefulSet")}


def _component(doc: dict[str, Any]) -> str:
    return str(doc["metadata"]["labels"]["app.kubernetes.io/component"])


def template_with(helm: Path, sets: str) -> subprocess.CompletedProcess[str]:
    """`helm template` with `--set sets`, not asserting success (for values that must be refused)."""
    return run(helm, "template", "sluice", CHART, "--kube-version", KUBE_VERSION, "--set", sets, check=False)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_helm_lint_is_clean(helm: Path, value_set: str) -> None:
    args: list[str | Path] = [helm, "lint", "--strict", "--kube-version", KUBE_VERSION, CHART]
    for path in VALUE_SETS[value_set]:
        args += ["-f", path]
    run(*args)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_rendered_chart_validates_with_kubeconform(
    helm: Path, kubeconform: Path, k8s_schemas: str, tmp_path: Path, value_set: str
) -> None:
    args: list[str | Path] = [helm, "template", "sluice", CHART, "--kube-version", KUBE_VERSION]
    for path in VALUE_SETS[value_set]:
        args += ["-f", path]
    manifest = tmp_path / "rendered.yaml"
    manifest.write_text(run(*args).stdout)
    done = run(
        kubeconform,
        "-strict",
        "-summary",
        "-kubernetes-version",
        KUBE_VERSION,
        "-schema-location",
        k8s_schemas,
        "-skip",
        ",".join(CRD_KINDS),
        manifest,
    )
    assert "Invalid: 0, Errors: 0" in done.stdout, done.stdout


def test_kubeconform_rejects_an_invalid_manifest(kubeconform: Path, k8s_schemas: str, tmp_path: Path) -> None:
    """The validation above can fail: a misspelt field in a Deployment is reported."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "x"},
                "spec": {"replicas": "two", "selector": {"matchLabels": {"a": "b"}}, "template": {}},
            }
        )
    )
    done = run(
        kubeconform, "-strict", "-kubernetes-version", KUBE_VERSION,
        "-schema-location", k8s_schemas, bad, check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "replicas" in done.stdout, done.stdout


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_service_has_workload_service_pdb_and_grpc_probes(render: Render, value_set: str) -> None:
    docs = render(*VALUE_SETS[value_set])
    settings = Settings()
    workloads = {_component(d): d for d in _workloads(docs).values()}
    services = {_component(d): d for d in of_kind(docs, "Service").values()}
    pdbs = {_component(d): d for d in of_kind(docs, "PodDisruptionBudget").values()}
    for name in SERVICES:
        assert name in workloads and name in services and name in pdbs, name
        pod = workloads[name]["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert container["args"] == ["serve", name]
        port = settings.grpc_port(name)
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
            "grpc": port,
            "metrics": settings.metrics_port(name),
        }
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"] == {"port": port}, (name, probe)
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["terminationGracePeriodSeconds"] > settings.drain_timeout_s
        assert {p["port"] for p in services[name]["spec"]["ports"]} == {port, settings.metrics_port(name)}
        assert pdbs[name]["spec"]["selector"] == workloads[name]["spec"]["selector"]


def test_gateway_replica_n_reads_reply_partition_n(render: Render) -> None:
    docs = render(*PRODUCTION)
    gateway = next(d for d in of_kind(docs, "StatefulSet").values() if _component(d) == "gateway")
    env = {e["name"]: e for e in gateway["spec"]["template"]["spec"]["containers"][0]["env"]}
    source = env["SLUICE_GATEWAY_REPLY_PARTITION"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert source == "metadata.labels['apps.kubernetes.io/pod-index']"


def test_more_gateways_than_reply_partitions_is_refused(helm: Path) -> None:
    partitions = PLAN["topics"]["sluice.tokens.v1"]["partitions"]
    done = template_with(helm, f"services.gateway.replicas={partitions + 1}")
    assert done.returncode != 0
    assert "exceeds the partitions of sluice.tokens.v1" in done.stderr


def test_config_map_sets_only_real_settings(render: Render) -> None:
    """Every SLUICE_* variable the chart sets is one the services read."""
    fields = {f"SLUICE_{name.upper()}" for name in Settings.model_fields}
    for docs in (render(), render(*PRODUCTION)):
        config = of_kind(docs, "ConfigMap")["sluice-config"]["data"]
        assert set(config) - fields == set()
        if config["SLUICE_KAFKA_SECURITY_PROTOCOL"] == "PLAINTEXT":
            load_settings(**{k.removeprefix("SLUICE_").lower(): v for k, v in config.items()})


def test_secured_kafka_values_become_settings_the_services_accept(render: Render, tmp_path: Path) -> None:
    """SASL_SSL with mutual TLS from chart values: the pod's env and mounted files load as
    valid settings, and the Kafka clients get exactly that login and that trust."""
    tls = make_tls_material(tmp_path / "pki")
    values = tmp_path / "secured.yaml"
    security = {
        "protocol": "SASL_SSL",
        "sasl": {"mechanism": "SCRAM-SHA-256", "username": "sluice", "password": "pw-from-values"},
        "tls": {
            "caCert": tls.ca.read_text(),
            "clientCert": tls.client.cert.read_text(),
            "clientKey": tls.client.key.read_text(),
        },
    }
    chart_values = {
        "kafka": {"security": security},
        "topics": {"applyJob": {"enabled": False}},
        "services": {"inference": {"autoscaling": {"enabled": True}}},  # KEDA logs in the same way
    }
    values.write_text(yaml.safe_dump(chart_values))
    docs = render(values)
    secret = of_kind(docs, "Secret")["sluice-kafka"]["stringData"]
    config = of_kind(docs, "ConfigMap")["sluice-config"]["data"]
    pod = of_kind(docs, "Deployment")["sluice-redaction"]["spec"]["template"]["spec"]
    (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "kafka-tls"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "kafka-tls"]
    assert volume["secret"]["secretName"] == "sluice-kafka"
    # Materialise the pod: the Secret's keys as the mounted files, its refs as env.
    mounted = tmp_path / "mounted"
    mounted.mkdir()
    for key, text in secret.items():
        (mounted / key).write_text(text)
    env = {k: v.replace(mount["mountPath"], str(mounted)) for k, v in config.items()}
    for item in pod["containers"][0]["env"]:
        ref = item.get("valueFrom", {}).get("secretKeyRef", {})
        if ref.get("name") == "sluice-kafka":
            env[item["name"]] = secret[ref["key"]]
    kafka = {k: v for k, v in env.items() if k.startswith("SLUICE_KAFKA_")}
    settings = load_settings(**{k.removeprefix("SLUICE_").lower(): v for k, v in kafka.items()})
    options = kafka_security.client_options(settings)
    assert options["security_protocol"] == "SASL_SSL" and options["sasl_mechanism"] == "SCRAM-SHA-256"
    assert (options["sasl_plain_username"], options["sasl_plain_password"]) == ("sluice", "pw-from-values")
    assert settings.kafka_ssl_cert_file is not None and settings.kafka_ssl_check_hostname
    auth = of_kind(docs, "TriggerAuthentication")["sluice-kafka"]["spec"]["secretTargetRef"]
    assert {r["parameter"] for r in auth} == {"username", "password", "ca", "cert", "key"}


def test_topic_job_gets_the_kafka_login(helm: Path, render: Render) -> None:
    """The pre-install topics Job authenticates like the services, from an existing Secret."""
    sets = ("kafka.security.protocol=SASL_SSL", "kafka.security.existingSecret=kafka-login")
    (job,) = of_kind(render(sets=sets), "Job").values()
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    assert env["SLUICE_KAFKA_SECURITY_PROTOCOL"]["value"] == "SASL_SSL"
    assert env["SLUICE_KAFKA_SASL_MECHANISM"]["value"] == "SCRAM-SHA-512"
    assert env["SLUICE_KAFKA_SSL_CA_FILE"]["value"] == "/etc/sluice/kafka-tls/ca.crt"
    assert env["SLUICE_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "kafka-login",
        "key": "sasl-password",
    }
    assert any(m["name"] == "kafka-tls" for m in container["volumeMounts"])
    # Without an existing Secret the hook would wait for one the chart creates only after it.
    done = template_with(
        helm, "kafka.security.protocol=SASL_SSL,kafka.security.sasl.username=u,kafka.security.sasl.password=p"
    )
    assert done.returncode != 0 and "needs kafka.security.existingSecret" in done.stderr


def test_strimzi_topics_render_every_topic_of_the_plan(render: Render) -> None:
    topics = of_kind(render(*PRODUCTION), "KafkaTopic")
    assert set(topics) == set(PLAN["topics"])
    for name, spec in PLAN["topics"].items():
        topic = topics[name]
        assert topic["apiVersion"] == "kafka.strimzi.io/v1beta2"
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == "sluice-kafka"
        assert topic["spec"]["topicName"] == name
        assert topic["spec"]["partitions"] == spec["partitions"]
        assert topic["spec"]["replicas"] == 3
        assert topic["spec"]["config"]["retention.ms"] == str(spec["retention_ms"])
        assert topic["spec"]["config"]["cleanup.policy"] == spec["cleanup_policy"]


def test_without_strimzi_a_hook_job_applies_the_topic_plan(render: Render) -> None:
    docs = render()
    assert not of_kind(docs, "KafkaTopic")
    (job,) = of_kind(docs, "Job").values()
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["topics", "apply"]


def test_chart_copies_match_their_sources() -> None:
    """files/ holds copies (helm cannot read outside the chart); `make helm-sync` refreshes them."""
    for source, copy in (
        ("schemas/topics.yaml", "topics.yaml"),
        ("monitoring/prometheus/sluice-rules.yaml", "sluice-rules.yaml"),
        ("monitoring/grafana/sluice-overview.json", "sluice-overview.json"),
    ):
        assert (CHART / "files" / copy).read_text() == (REPO_ROOT / source).read_text(), (
            f"helm/sluice/files/{copy} is stale: run `make helm-sync`"
        )


def test_keda_scales_redaction_and_inference_on_their_groups_lag(render: Render) -> None:
    docs = render(*PRODUCTION)
    scaled = {_component(d): d for d in of_kind(docs, "ScaledObject").values()}
    workloads = _workloads(docs)
    groups = {
        "redaction": "sluice-redaction",
        "inference": f"sluice-inference-{Settings().catalog.default_model}",
    }
    assert set(groups) <= set(scaled)
    for name, doc in scaled.items():
        spec = doc["spec"]
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
        assert spec["scaleTargetRef"]["name"] in workloads
        assert "replicas" not in workloads[spec["scaleTargetRef"]["name"]]["spec"], "KEDA owns replicas"
        kafka = next(t for t in spec["triggers"] if t["type"] == "kafka")
        if name in groups:
            assert kafka["metadata"]["consumerGroup"] == groups[name]
        topic = kafka["metadata"]["topic"]
        assert spec["maxReplicaCount"] <= PLAN["topics"][topic]["partitions"]
        assert spec["fallback"]["replicas"] >= spec["minReplicaCount"]
        assert int(kafka["metadata"]["lagThreshold"]) > 0
        assert kafka["metadata"]["sasl"] == "scram_sha512" and kafka["metadata"]["tls"] == "enable"
        assert kafka["authenticationRef"]["name"] in of_kind(docs, "TriggerAuthentication")
        assert any(t["type"] == "cpu" for t in spec["triggers"])


def test_without_keda_a_cpu_hpa_scales_the_workers(render: Render) -> None:
    docs = render(
        sets=("services.redaction.autoscaling.enabled=true", "services.redaction.autoscaling.keda=false")
    )
    assert not of_kind(docs, "ScaledObject")
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] in of_kind(docs, "Deployment")
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_autoscaling_beyond_the_topic_partitions_is_refused(helm: Path) -> None:
    done = run(
        helm, "template", "sluice", CHART, "--kube-version", KUBE_VERSION, "-f", PRODUCTION[0],
        "--set", "services.redaction.autoscaling.maxReplicas=50", check=False,
    )  # fmt: skip
    assert done.returncode != 0 and "exceeds the 6 partitions of sluice.requests.v1" in done.stderr


def test_trtllm_workers_get_gpus_node_selector_and_tolerations(render: Render) -> None:
    docs = render(*PRODUCTION)
    (worker,) = (d for d in of_kind(docs, "Deployment").values() if _component(d) == "inference-trtllm")
    pod = worker["spec"]["template"]["spec"]
    resources = pod["containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1 == resources["requests"]["nvidia.com/gpu"]
    assert pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["SLUICE_MODELS_FILE"] == "/etc/sluice/models/models.yaml"
    models = yaml.safe_load(of_kind(docs, "ConfigMap")["sluice-trtllm-models"]["data"]["models.yaml"])
    assert {m["engine"] for m in models["models"].values()} == {"trtllm"}


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_network_policies_allow_dns_kafka_and_declared_clients_only(render: Render, value_set: str) -> None:
    docs = render(*VALUE_SETS[value_set])
    policies = of_kind(docs, "NetworkPolicy")
    base = policies["sluice-base"]["spec"]
    assert base["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "sluice",
        "app.kubernetes.io/instance": "sluice",
    }
    assert base["policyTypes"] == ["Ingress", "Egress"]
    dns, kafka = base["egress"]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert {p["port"] for p in kafka["ports"]} == {9092, 9093}
    assert kafka["to"], "egress to Kafka must name the brokers"
    settings = Settings()
    assert {p["port"] for p in base["ingress"][0]["ports"]} == {settings.metrics_port(s) for s in SERVICES}
    for name in SERVICES:
        api = policies[f"sluice-{name}-api"]["spec"]
        assert api["policyTypes"] == ["Ingress"]
        assert api["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == name
        assert [p["port"] for p in api["ingress"][0]["ports"]] == [settings.grpc_port(name)]
        if name != "gateway":
            assert api["ingress"][0]["from"], f"{name}'s API must not be open to everyone"


def test_default_install_generates_master_keys_once(render: Render) -> None:
    secret = of_kind(render(), "Secret")["sluice-keys"]
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    for key in ("redaction-master-key", "audit-master-key"):
        assert len(base64.b64decode(base64.b64decode(secret["data"][key]))) == 32


def test_production_takes_keys_and_kafka_credentials_from_existing_secrets(render: Render) -> None:
    docs = render(*PRODUCTION)
    assert not of_kind(docs, "Secret"), "production values must not put secrets in the chart"
    gateway = of_kind(docs, "StatefulSet")["sluice-gateway"]["spec"]["template"]["spec"]["containers"][0]
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in gateway["env"] if "secretKeyRef" in str(e)
    }
    assert refs["SLUICE_REDACTION_MASTER_KEY"] == refs["SLUICE_AUDIT_MASTER_KEY"] == "sluice-master-keys"
    assert refs["SLUICE_KAFKA_SASL_PASSWORD"] == "sluice-kafka-credentials"
    auth = of_kind(docs, "TriggerAuthentication")["sluice-kafka"]["spec"]["secretTargetRef"]
    assert {r["parameter"] for r in auth} == {"username", "password", "ca"}


def test_service_monitor_rules_and_dashboard(render: Render) -> None:
    docs = render(*PRODUCTION)
    (monitor,) = of_kind(docs, "ServiceMonitor").values()
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/instance"] == "sluice"
    (rule,) = of_kind(docs, "PrometheusRule").values()
    records = {r.get("record"): r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert records["sluice:slo_ttft_p95_bound_seconds"] == "vector(1.5)"
    source = yaml.safe_load((REPO_ROOT / "monitoring" / "prometheus" / "sluice-rules.yaml").read_text())
    alerts = {r["alert"] for g in source["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {r["alert"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r}
    dashboard = of_kind(docs, "ConfigMap")["sluice-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert '"uid": "sluice-overview"' in dashboard["data"]["sluice-overview.json"]


def test_plaintext_kafka_needs_no_credentials(render: Render) -> None:
    """The default (PLAINTEXT) install has no Kafka Secret and no TriggerAuthentication."""
    docs = render(sets=("services.inference.autoscaling.enabled=true",))
    assert not of_kind(docs, "TriggerAuthentication")
    assert "sluice-kafka" not in of_kind(docs, "Secret")
    (scaled,) = of_kind(docs, "ScaledObject").values()
    assert "authenticationRef" not in scaled["spec"]["triggers"][0]
