"""The Helm chart (deploy/helm/twinstore), rendered by Helm's engine with realistic value sets:
every manifest validates against Kubernetes' own JSON schemas in strict mode (unknown fields
are errors), and the rendered objects do what the chart promises."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes_validate
import pytest
import yaml

from adapters.base import forwarder_from_config
from adapters.mqtt import MqttAdapter
from adapters.opcua import parse_config
from twinstore.settings import load_settings

from .conftest import CHART, NAMESPACE, RELEASE, Manifest, Rendered, helm
from .values_sets import MINIMAL, PRODUCTION, VALUE_SETS

# Strict validation against the oldest and the newest Kubernetes the validator ships that the
# chart targets: a field dropped or added between them shows up here.
KUBERNETES = ("1.30", "1.37")
STANDARD_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "helm.sh/chart",
)
FULLNAME = f"{RELEASE}-twinstore"

RenderFn = Callable[[dict[str, Any]], Rendered]


@pytest.fixture(scope="module", params=sorted(VALUE_SETS))
def rendered(request: pytest.FixtureRequest, render: RenderFn) -> Rendered:
    return render(VALUE_SETS[request.param])


def pod_specs(r: Rendered) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    """(object, pod spec) of every workload, CronJobs included."""
    for o in r.objects:
        spec = o.get("spec", {})
        if o["kind"] in ("Deployment", "StatefulSet", "Job"):
            yield o, spec["template"]["spec"]
        elif o["kind"] == "CronJob":
            yield o, spec["jobTemplate"]["spec"]["template"]["spec"]


def containers(r: Rendered) -> Iterator[tuple[Manifest, dict[str, Any]]]:
    for o, pod in pod_specs(r):
        for c in pod.get("initContainers", []) + pod["containers"]:
            yield o, c


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def check_service_monitor(o: Manifest) -> None:
    """kubernetes-validate has no CRD schemas: the fields Prometheus Operator needs."""
    assert o["apiVersion"] == "monitoring.coreos.com/v1"
    spec = o["spec"]
    assert set(spec) <= {"selector", "namespaceSelector", "endpoints", "jobLabel"}
    assert spec["selector"]["matchLabels"]
    assert spec["endpoints"]
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        assert endpoint["port"] in ("http", "metrics") and endpoint["path"] == "/metrics"


# ---- every value set -------------------------------------------------------------------------


def test_manifests_validate_strictly(rendered: Rendered) -> None:
    assert rendered.objects
    for o in rendered.objects:
        if o["kind"] == "ServiceMonitor":
            check_service_monitor(o)
            continue
        for version in KUBERNETES:
            try:
                kubernetes_validate.validate(o, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(
                    f"{o['kind']}/{o['metadata']['name']} (Kubernetes {version}): {path}: {exc.message}"
                )


@pytest.mark.parametrize("name", sorted(VALUE_SETS))
def test_lint_is_clean(name: str) -> None:
    report = helm.lint(str(CHART), VALUE_SETS[name], strict=True, namespace=NAMESPACE, kube_version="v1.30.0")
    # severity 1 is information (Chart.yaml: "icon is recommended"); 2 warning, 3 error
    assert [m for m in report["messages"] if m["severity"] >= 2] == [] and report["errors"] == []


def test_standard_labels_on_every_object_and_pod(rendered: Rendered) -> None:
    for o in rendered.objects:
        labels = o["metadata"].get("labels", {})
        missing = [k for k in STANDARD_LABELS if k not in labels]
        assert not missing, f"{o['kind']}/{o['metadata']['name']} lacks {missing}"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert o["metadata"].get("namespace") == NAMESPACE
    for o, _ in pod_specs(rendered):
        tpl = (
            o["spec"]["jobTemplate"]["spec"]["template"] if o["kind"] == "CronJob" else o["spec"]["template"]
        )
        assert all(k in tpl["metadata"]["labels"] for k in STANDARD_LABELS)
        assert "app.kubernetes.io/component" in tpl["metadata"]["labels"]
        selector = o["spec"].get("selector", {}).get("matchLabels", {})
        assert selector.items() <= tpl["metadata"]["labels"].items()


def test_pod_security_everywhere(rendered: Rendered) -> None:
    workloads = list(pod_specs(rendered))
    assert workloads
    for o, pod in workloads:
        where = f"{o['kind']}/{o['metadata']['name']}"
        psc = pod["securityContext"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001, where
        assert psc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert pod["automountServiceAccountToken"] is False, where
        # Kubernetes would set TWINSTORE_PORT=tcp://... for a Service named twinstore
        assert pod["enableServiceLinks"] is False, where
        assert any(v["name"] == "tmp" and "emptyDir" in v for v in pod["volumes"]), where
    for o, c in containers(rendered):
        where = f"{o['kind']}/{o['metadata']['name']}/{c['name']}"
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc["runAsUser"] == 10001, where
        assert sc["readOnlyRootFilesystem"] is True, where
        assert sc["allowPrivilegeEscalation"] is False, where
        assert sc["capabilities"] == {"drop": ["ALL"]}, where
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], where
        assert c["resources"]["requests"]["memory"] and c["resources"]["limits"]["memory"], where


def test_every_referenced_secret_and_configmap_exists(
    rendered: Rendered, request: pytest.FixtureRequest
) -> None:
    """A reference names a Secret of the release holding that key, or an existingSecret from the
    values; a pre-install hook refers only to what exists before the release's own objects."""
    values = VALUE_SETS[request.node.callspec.params["rendered"]]
    external = {ref["name"] for ref in _existing_secrets(values)}
    external |= {"twinstore-db-app"} if not values.get("database", {}).get("url") else set()
    secrets = {o["metadata"]["name"]: o for o in rendered.of("Secret")}
    configmaps = {o["metadata"]["name"] for o in rendered.of("ConfigMap")}

    def check(o: Manifest, name: str, key: str | None) -> None:
        where = f"{o['kind']}/{o['metadata']['name']} -> secret {name}"
        if name in external:
            return
        assert name in secrets, where
        if key is not None:
            assert key in secrets[name]["data"], f"{where}: no key {key}"
        if "helm.sh/hook" in o["metadata"].get("annotations", {}):
            hook = secrets[name]["metadata"].get("annotations", {})
            assert "pre-install" in hook.get("helm.sh/hook", ""), f"{where}: not there before the hook runs"
            assert int(hook["helm.sh/hook-weight"]) < int(o["metadata"]["annotations"]["helm.sh/hook-weight"])

    for o, pod in pod_specs(rendered):
        for volume in pod["volumes"]:
            if "secret" in volume:
                for item in volume["secret"].get("items", [{"key": None}]):
                    check(o, volume["secret"]["secretName"], item["key"])
        for c in pod["containers"]:
            for value in env_of(c).values():
                if isinstance(value, dict) and "secretKeyRef" in value:
                    check(o, value["secretKeyRef"]["name"], value["secretKeyRef"]["key"])
            for source in c.get("envFrom", []):
                assert "helm.sh/hook" not in o["metadata"].get("annotations", {})
                assert source["configMapRef"]["name"] in configmaps


def _existing_secrets(values: dict[str, Any]) -> Iterator[dict[str, str]]:
    def walk(node: Any) -> Iterator[dict[str, str]]:
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "existingSecret" and isinstance(v, dict) and v.get("name"):
                    yield v
                else:
                    yield from walk(v)
        elif isinstance(node, list):
            for item in node:
                yield from walk(item)

    return walk(values)


def test_settings_reach_twinstore_as_it_parses_them(rendered: Rendered) -> None:
    """The ConfigMap and the container env, read by twinstore's own load_settings."""
    data = rendered.get("ConfigMap", FULLNAME)["data"]
    api = rendered.get("Deployment", f"{FULLNAME}-api")["spec"]["template"]["spec"]["containers"][0]
    environ = dict(data)
    environ.update({k: v for k, v in env_of(api).items() if isinstance(v, str)})
    environ |= {"TWINSTORE_DATABASE_URL": "postgresql://db/x", "TWINSTORE_NATS_URL": "nats://nats:4222"}
    environ.pop("TWINSTORE_JWT_ISSUERS", None)  # a secret reference here
    settings = load_settings(environ)
    assert not settings.embedded
    for name, raw in data.items():
        assert "e+" not in raw, f"{name}={raw}: a number in Go's exponent notation"
        assert hasattr(settings, name.removeprefix("TWINSTORE_").lower())


def test_one_partition_count_for_server_and_adapters(render: RenderFn) -> None:
    """The default values give the server and every adapter the same count (64, as twinstore's
    default for a new database): an adapter has no database to read it from."""
    adapter = {"name": "plant-mqtt", "type": "mqtt", "config": {"nats_url": "nats://nats:4222"}}
    r = render({"adapters": [adapter]})
    assert r.get("ConfigMap", FULLNAME)["data"]["TWINSTORE_PARTITIONS"] == "64"
    secret = r.get("Secret", f"{FULLNAME}-adapter-plant-mqtt")["data"]["config.yaml"]
    assert yaml.safe_load(base64.b64decode(secret))["partitions"] == 64
    # null: the server takes the database's count, the adapters twinstore's default
    r = render({"adapters": [adapter], "settings": {"partitions": None}})
    assert "TWINSTORE_PARTITIONS" not in r.get("ConfigMap", FULLNAME)["data"]
    secret = r.get("Secret", f"{FULLNAME}-adapter-plant-mqtt")["data"]["config.yaml"]
    assert yaml.safe_load(base64.b64decode(secret))["partitions"] == 64


# ---- what particular value sets promise --------------------------------------------------------


def test_default_roles_probes_and_ports(render: RenderFn) -> None:
    r = render({})
    assert r.names("Deployment") == {f"{FULLNAME}-api", f"{FULLNAME}-ingest", f"{FULLNAME}-anomaly"}
    api = r.get("Deployment", f"{FULLNAME}-api")["spec"]["template"]["spec"]["containers"][0]
    assert api["args"] == ["serve", "--host", "0.0.0.0", "--port", "8080", "--no-ingest", "--no-anomaly"]
    assert api["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert (
        api["livenessProbe"]["httpGet"],
        api["readinessProbe"]["httpGet"],
        api["startupProbe"]["httpGet"],
    ) == (
        {"path": "/health", "port": "http"},
        {"path": "/ready", "port": "http"},
        {"path": "/health", "port": "http"},
    )
    assert "TWINSTORE_METRICS_PORT" not in env_of(api)
    for role in ("ingest", "anomaly"):
        c = r.get("Deployment", f"{FULLNAME}-{role}")["spec"]["template"]["spec"]["containers"][0]
        assert c["args"] == [role]
        assert c["ports"] == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]
        assert env_of(c)["TWINSTORE_METRICS_PORT"] == "9464"
        assert {p: c[p]["httpGet"] for p in ("livenessProbe", "readinessProbe", "startupProbe")} == {
            "livenessProbe": {"path": "/health", "port": "metrics"},
            "readinessProbe": {"path": "/ready", "port": "metrics"},
            "startupProbe": {"path": "/health", "port": "metrics"},
        }
    service = r.get("Service", FULLNAME)
    assert service["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "api"
    # Lean by default: one pod per role, no PDB, HPA, Ingress, NetworkPolicy or monitor.
    for kind in (
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Ingress",
        "NetworkPolicy",
        "ServiceMonitor",
    ):
        assert not r.of(kind), kind
    for d in r.of("Deployment"):
        pod = d["spec"]["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 30
        assert "cpu" not in pod["containers"][0]["resources"].get("limits", {})
    # CloudNativePG's application secret and the NATS chart's service
    assert env_of(api)["TWINSTORE_DATABASE_URL"] == {
        "secretKeyRef": {"name": "twinstore-db-app", "key": "uri"}
    }
    nats = r.get("Secret", FULLNAME)["data"]["nats-url"]
    assert base64.b64decode(nats).decode() == "nats://nats:4222"


def test_minimal_runs_one_api_doing_everything(render: RenderFn) -> None:
    r = render(MINIMAL)
    assert r.names("Deployment") == {f"{FULLNAME}-api"}
    assert not r.of("Job")
    api = r.get("Deployment", f"{FULLNAME}-api")["spec"]["template"]["spec"]
    container = api["containers"][0]
    assert "--no-ingest" not in container["args"] and "--no-anomaly" not in container["args"]
    assert env_of(container)["TWINSTORE_USERS_FILE"] == "/etc/twinstore/users/users.htpasswd"
    # mounted as a directory (no subPath), so Kubernetes' updates of the Secret reach the file
    mount = next(m for m in container["volumeMounts"] if m["name"] == "users")
    assert mount == {"name": "users", "mountPath": "/etc/twinstore/users", "readOnly": True}
    secret = r.get("Secret", FULLNAME)["data"]
    assert set(secret) == {"database-url", "nats-url", "users.htpasswd"}
    assert "WARNING" not in r.notes


def test_production(render: RenderFn) -> None:
    r = render(PRODUCTION)
    api = r.get("Deployment", f"{FULLNAME}-api")
    assert "replicas" not in api["spec"], "the HPA owns the replica count"
    hpa = r.get("HorizontalPodAutoscaler", f"{FULLNAME}-api")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": f"{FULLNAME}-api",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 10)
    assert {m["resource"]["name"] for m in hpa["spec"]["metrics"]} == {"cpu", "memory"}
    assert r.names("PodDisruptionBudget") == {f"{FULLNAME}-api", f"{FULLNAME}-ingest", f"{FULLNAME}-anomaly"}
    for pdb in r.of("PodDisruptionBudget"):
        assert pdb["spec"]["maxUnavailable"] == 1
    pod = api["spec"]["template"]["spec"]
    assert pod["topologySpreadConstraints"][0]["topologyKey"] == "topology.kubernetes.io/zone"
    assert pod["containers"][0]["lifecycle"] == {"preStop": {"sleep": {"seconds": 3}}}
    env = env_of(pod["containers"][0])
    assert env["TWINSTORE_NATS_URL"] == {"secretKeyRef": {"name": "twinstore-nats", "key": "url"}}
    assert env["TWINSTORE_JWT_ISSUERS"] == {"secretKeyRef": {"name": "twinstore-jwt", "key": "issuers.json"}}
    assert env["TWINSTORE_AUDIT_SIGNING_KEY"] == "/etc/twinstore/audit/signing-key.pem"
    # everything secret comes from existing secrets: the chart makes none of its own
    assert FULLNAME not in r.names("Secret")

    ingress = r.get("Ingress", FULLNAME)
    assert ingress["spec"]["tls"] == [{"hosts": ["twins.example.com"], "secretName": "twins-example-com-tls"}]
    paths = ingress["spec"]["rules"][0]["http"]["paths"]
    assert [p["path"] for p in paths] == ["/api", "/ws"]
    assert all(p["backend"]["service"] == {"name": FULLNAME, "port": {"name": "http"}} for p in paths)

    monitor = r.get("ServiceMonitor", FULLNAME)
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert r.names("Service") == {FULLNAME, f"{FULLNAME}-ingest-metrics", f"{FULLNAME}-anomaly-metrics"}
    for role in ("ingest", "anomaly"):
        svc = r.get("Service", f"{FULLNAME}-{role}-metrics")
        assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["ports"][0]["name"] == "metrics"

    cron = r.get("CronJob", f"{FULLNAME}-audit-checkpoint")
    job = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    assert job["args"] == ["audit", "checkpoint", "--json"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"


def test_ingress_keeps_operations_endpoints_inside(render: RenderFn) -> None:
    """/health, /ready and /metrics answer without authentication: the default Ingress routes
    only the API and the WebSocket."""
    ingress = render({"ingress": {"enabled": True}}).get("Ingress", FULLNAME)
    prefixes = [p["path"] for rule in ingress["spec"]["rules"] for p in rule["http"]["paths"]]
    assert prefixes == ["/api", "/ws"]
    for path in ("/metrics", "/health", "/ready"):
        assert not any(path.startswith(prefix) for prefix in prefixes)


def test_network_policies(render: RenderFn) -> None:
    r = render(PRODUCTION)
    egress = r.get("NetworkPolicy", f"{FULLNAME}-egress")["spec"]
    assert egress["policyTypes"] == ["Egress"]
    ports = [{p["port"] for p in rule["ports"]} for rule in egress["egress"]]
    assert ports == [{53}, {5432}, {4222}]
    assert egress["egress"][1]["to"] == [
        {"podSelector": {"matchLabels": {"cnpg.io/cluster": "twinstore-db"}}}
    ]
    api = r.get("NetworkPolicy", f"{FULLNAME}-api")["spec"]
    assert api["ingress"][0]["ports"] == [{"port": "http", "protocol": "TCP"}]
    assert api["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "ingress-nginx"
    }
    workers = r.get("NetworkPolicy", f"{FULLNAME}-workers")["spec"]
    assert workers["ingress"] == [
        {
            "ports": [{"port": "metrics", "protocol": "TCP"}],
            "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
        }
    ]
    assert r.get("NetworkPolicy", f"{FULLNAME}-adapter-plant-mqtt")["spec"]["egress"] == [
        {"ports": [{"port": 8883, "protocol": "TCP"}]}
    ]


def test_pdb_only_with_more_than_one_pod(render: RenderFn) -> None:
    def pdbs(values: dict[str, Any]) -> set[str]:
        return {n.removeprefix(f"{FULLNAME}-") for n in render(values).names("PodDisruptionBudget")}

    assert pdbs({}) == set()
    assert pdbs({"api": {"replicas": 2}}) == {"api"}
    assert pdbs({"ingest": {"replicas": 3}, "anomaly": {"replicas": 1}}) == {"ingest"}
    assert pdbs({"api": {"replicas": 1, "autoscaling": {"enabled": True, "minReplicas": 2}}}) == {"api"}
    assert pdbs({"api": {"replicas": 5, "autoscaling": {"enabled": True, "minReplicas": 1}}}) == set()
    assert pdbs({"api": {"replicas": 3}, "podDisruptionBudget": {"enabled": False}}) == set()


def test_migration_job_is_a_pre_install_and_pre_upgrade_hook(render: RenderFn) -> None:
    for values, secret in (({}, "twinstore-db-app"), (VALUE_SETS["inline"], f"{FULLNAME}-migrate")):
        r = render(values)
        job = r.get("Job", f"{FULLNAME}-migrate")
        assert job["metadata"]["annotations"] == {
            "helm.sh/hook": "pre-install,pre-upgrade",
            "helm.sh/hook-weight": "0",
            "helm.sh/hook-delete-policy": "before-hook-creation,hook-succeeded",
        }
        pod = job["spec"]["template"]["spec"]
        assert pod["restartPolicy"] == "Never"
        # the release's ServiceAccount, ConfigMap and Secret do not exist yet at pre-install
        assert pod["serviceAccountName"] == "default"
        container = pod["containers"][0]
        assert container["args"] == ["migrate"] and "envFrom" not in container
        assert env_of(container)["TWINSTORE_DATABASE_URL"]["secretKeyRef"]["name"] == secret
    hook_secret = r.get("Secret", f"{FULLNAME}-migrate")
    assert hook_secret["metadata"]["annotations"]["helm.sh/hook-weight"] == "-10"
    assert (
        base64.b64decode(hook_secret["data"]["database-url"]).decode()
        == VALUE_SETS["inline"]["database"]["url"]
    )


def test_inline_secrets(render: RenderFn) -> None:
    r = render(VALUE_SETS["inline"])
    data = {k: base64.b64decode(v).decode() for k, v in r.get("Secret", FULLNAME)["data"].items()}
    assert set(data) == {"database-url", "nats-url", "users.htpasswd", "jwt-issuers.json", "signing-key.pem"}
    issuers = json.loads(data["jwt-issuers.json"])
    # twinstore parses exactly this JSON from TWINSTORE_JWT_ISSUERS
    settings = load_settings({"TWINSTORE_JWT_ISSUERS": data["jwt-issuers.json"]})
    assert [i.prefix for i in settings.jwt_issuers] == [i["prefix"] for i in issuers] == ["idp", "ci"]
    api = r.get("Deployment", f"{FULLNAME}-api")["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in api["containers"][0]["volumeMounts"]}
    assert mounts["audit-key"] == "/etc/twinstore/audit"
    audit = next(v for v in api["volumes"] if v["name"] == "audit-key")["secret"]
    assert audit["items"] == [{"key": "signing-key.pem", "path": "signing-key.pem"}]


def test_adapters(render: RenderFn) -> None:
    r = render(PRODUCTION)
    mqtt = r.get("StatefulSet", f"{FULLNAME}-adapter-plant-mqtt")
    assert mqtt["spec"]["replicas"] == 1
    claim = mqtt["spec"]["volumeClaimTemplates"][0]["spec"]
    assert claim["resources"]["requests"]["storage"] == "5Gi" and claim["storageClassName"] == "fast"
    container = mqtt["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["twinstore-adapter"]
    assert container["args"][:3] == ["mqtt", "--config", "/etc/twinstore-adapter/config.yaml"]
    assert {"name": "spool", "mountPath": "/var/lib/twinstore-adapter"} in container["volumeMounts"]
    config = yaml.safe_load(
        base64.b64decode(r.get("Secret", f"{FULLNAME}-adapter-plant-mqtt")["data"]["config.yaml"])
    )
    assert config["source"] == "plant-mqtt" and config["spool_dir"] == "/var/lib/twinstore-adapter"
    assert config["nats_url"] == "nats://adapter:secret@nats:4222"  # the config's own wins
    assert (config["nats_prefix"], config["partitions"]) == ("twinstore", 32)  # as the service's
    assert r.get("ConfigMap", FULLNAME)["data"]["TWINSTORE_PARTITIONS"] == "32"  # one value for both
    # the adapter's own configuration code accepts what the chart wrote
    MqttAdapter(config, forwarder_from_config(config, "mqtt"))
    # an existing Secret is mounted as config.yaml whatever its key is called
    plc = r.get("StatefulSet", f"{FULLNAME}-adapter-plc-1")["spec"]["template"]["spec"]
    volume = next(v for v in plc["volumes"] if v["name"] == "config")["secret"]
    assert volume["secretName"] == "plc-1-adapter"
    assert volume["items"] == [{"key": "config.yaml", "path": "config.yaml"}]
    assert f"{FULLNAME}-adapter-plc-1" not in r.names("Secret")
    assert "WARNING" not in r.notes

    inline = render(VALUE_SETS["inline"])
    sts = inline.get("StatefulSet", f"{FULLNAME}-adapter-plc-2")
    assert "volumeClaimTemplates" not in sts["spec"]
    assert {"name": "spool", "emptyDir": {}} in sts["spec"]["template"]["spec"]["volumes"]
    config = yaml.safe_load(
        base64.b64decode(inline.get("Secret", f"{FULLNAME}-adapter-plc-2")["data"]["config.yaml"])
    )
    assert config["nats_url"] == "nats://user:pw@nats:4222"  # from nats.url
    parse_config(config)


def test_unmapped_adapter_source_is_warned_about(render: RenderFn) -> None:
    values = {"adapters": [{"name": "line-3", "type": "mqtt", "config": {"sparkplug": {"namespace": "x"}}}]}
    assert 'adapter line-3 publishes as source "line-3"' in render(values).notes
    values["settings"] = {"ingest_default_subjects": ["integration:any"]}
    assert "line-3" not in render(values).notes.split("WARNING", 1)[-1]


def test_config_and_secret_changes_roll_the_pods(render: RenderFn) -> None:
    def annotations(values: dict[str, Any]) -> dict[str, str]:
        pod = render(values).get("Deployment", f"{FULLNAME}-ingest")["spec"]["template"]["metadata"]
        return dict(pod["annotations"])

    base = annotations({})
    more = annotations({"settings": {"ingest_batch": 500}})
    secret = annotations({"database": {"url": "postgresql://other/db"}})
    assert (
        base["checksum/config"] != more["checksum/config"]
        and base["checksum/secret"] == more["checksum/secret"]
    )
    assert base["checksum/secret"] != secret["checksum/secret"]


def test_image_tag_and_digest(render: RenderFn) -> None:
    def image(values: dict[str, Any]) -> str:
        return str(
            render(values).get("Deployment", f"{FULLNAME}-api")["spec"]["template"]["spec"]["containers"][0][
                "image"
            ]
        )

    assert image({}) == "twinstore:0.1.0"  # the chart's appVersion
    assert image({"image": {"repository": "r.example/ts", "tag": "1.2.3"}}) == "r.example/ts:1.2.3"
    digest = "sha256:" + "a" * 64
    assert image({"image": {"tag": "1.2.3", "digest": digest}}) == f"twinstore@{digest}"
