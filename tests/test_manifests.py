"""The deployment files, checked against the service they deploy.

Kubernetes manifests, the compose file, the Prometheus alerts and the Grafana
dashboard are parsed and held to what the service really is: every
environment variable they set is a setting of ``Config``; the probe paths
answer on a real pod (readiness turns 503 while draining, liveness does not);
the grace period covers the preStop sleep, the drain delay and the shutdown
timeout; every PromQL expression names only the metrics of the public
contract, and none groups by room or user. Where promtool, docker-compose or
kubectl is installed, it checks its own files too.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from chat_api.config import Config, ConfigError

from .conftest import PodFactory
from .support import Pod, eventually

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUBE = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker-compose.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
DASHBOARD = DEPLOY / "grafana" / "chat-api.json"

SETTINGS = {f.metadata["env"]: f for f in Config.settings()}

# The metrics of the public contract (GET /metrics), as series names.
COUNTERS = {
    "chat_api_connections_opened_total",
    "chat_api_connections_closed_total",
    "chat_api_frames_received_total",
    "chat_api_errors_sent_total",
    "chat_api_messages_published_total",
    "chat_api_deliveries_total",
    "chat_api_redis_reconnects_total",
    "chat_api_redis_publish_failures_total",
    "chat_api_gap_repairs_total",
    "chat_api_catchups_total",
    "chat_api_slow_consumers_closed_total",
    "chat_api_rate_limited_total",
}
GAUGES = {"chat_api_connections", "chat_api_redis_link_up"}
HISTOGRAMS = {"chat_api_delivery_lag_seconds", "chat_api_redis_roundtrip_seconds"}
SERIES = (
    COUNTERS
    | GAUGES
    | {f"{h}{suffix}" for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
)
FORBIDDEN_LABELS = {"room", "user", "user_id", "room_id"}


# -- loading -------------------------------------------------------------------


def kube_docs() -> dict[str, Any]:
    """Every Kubernetes document by kind (one of each kind is expected)."""
    docs: dict[str, Any] = {}
    for path in sorted(KUBE.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["kind"] not in docs, f"two {doc['kind']} documents"
            docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def kube() -> dict[str, Any]:
    return kube_docs()


def container(kube: dict[str, Any]) -> dict[str, Any]:
    containers = kube["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return dict(containers[0])


def env_values(kube: dict[str, Any]) -> dict[str, str]:
    """What the pod's environment is, with the Secret's keys as placeholders."""
    values = dict(kube["ConfigMap"]["data"])
    for item in container(kube)["env"]:
        if "value" in item:
            values[item["name"]] = str(item["value"])
        else:
            values[item["name"]] = f"<from {next(iter(item['valueFrom']))}>"
    return values


def seconds(value: str) -> float:
    """A compose duration such as ``15s`` or ``1m30s``."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts, value
    assert "".join(n + u for n, u in parts) == value, value
    return sum(float(n) * units[u] for n, u in parts)


def setting(values: dict[str, str], name: str) -> float:
    raw = values.get(name)
    return float(raw) if raw else float(SETTINGS[name].default)


# -- Kubernetes ------------------------------------------------------------------


def test_every_manifest_has_the_kinds_expected(kube: dict[str, Any]) -> None:
    assert set(kube) == {
        "ConfigMap",
        "Deployment",
        "HorizontalPodAutoscaler",
        "Kustomization",
        "PodDisruptionBudget",
        "Secret",
        "Service",
    }
    listed = set(kube["Kustomization"]["resources"])
    files = {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}
    # The example Secret is the one file `kubectl apply -k` must not apply.
    assert listed == files - {"secret.example.yaml"}


def test_every_env_var_the_manifests_set_is_a_setting(kube: dict[str, Any]) -> None:
    names = set(kube["ConfigMap"]["data"]) | {e["name"] for e in container(kube)["env"]}
    names |= set(kube["Secret"]["stringData"])
    assert names - set(SETTINGS) == set()
    assert {"HOST", "PORT", "POD_ID", "REDIS_URL", "AUTH_JWT_SECRET"} <= names


def test_configmap_and_pod_env_are_valid_settings(kube: dict[str, Any]) -> None:
    env = {**env_values(kube), "POD_ID": "chat-api-7d9f-abcde"}
    real = {"AUTH_JWT_SECRET": "s" * 48, "REDIS_URL": "redis://:pw@redis:6379/0"}
    config = Config.load({**env, **real}, env_file=None)
    assert (config.host, config.port, config.auth_enabled) == ("0.0.0.0", 8000, True)
    # The example Secret's placeholder is refused at start-up, never used.
    example = kube["Secret"]["stringData"]
    with pytest.raises(ConfigError) as info:
        Config.load({**env, **example}, env_file=None)
    assert info.value.key == "AUTH_JWT_SECRET"


def test_pod_env_comes_from_configmap_secret_and_downward_api(kube: dict[str, Any]) -> None:
    c = container(kube)
    assert c["envFrom"] == [{"configMapRef": {"name": kube["ConfigMap"]["metadata"]["name"]}}]
    env = {e["name"]: e for e in c["env"]}
    assert env["HOST"]["value"] == "0.0.0.0"
    assert env["POD_ID"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    secret = kube["Secret"]
    for name in ("AUTH_JWT_SECRET", "REDIS_URL"):
        ref = env[name]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]
        assert ref["key"] in secret["stringData"]
    # Secrets never sit in the ConfigMap or in plain env values.
    secrets = {k for k, f in SETTINGS.items() if f.metadata["secret"]}
    assert not secrets & set(kube["ConfigMap"]["data"])
    assert not {n for n, e in env.items() if "value" in e} & secrets


def test_ports_probes_and_selectors_fit_together(kube: dict[str, Any]) -> None:
    c = container(kube)
    env = env_values(kube)
    (port,) = c["ports"]
    assert port["containerPort"] == int(env["PORT"]) == 8000
    probes = {k: c[k]["httpGet"] for k in ("readinessProbe", "livenessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == "/healthz"
    assert {p["port"] for p in probes.values()} == {port["name"]}
    template_labels = kube["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selector = kube["Deployment"]["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template_labels.items()
    service = kube["Service"]["spec"]
    assert service["selector"].items() <= template_labels.items()
    assert service["ports"][0]["targetPort"] == port["name"]
    assert service.get("sessionAffinity", "None") == "None"
    pdb = kube["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"]
    assert pdb.items() <= template_labels.items()
    annotations = kube["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])


async def test_probe_paths_answer_on_a_real_pod_and_only_readiness_drains(
    kube: dict[str, Any], pod_factory: PodFactory, session: aiohttp.ClientSession
) -> None:
    c = container(kube)
    ready_path = c["readinessProbe"]["httpGet"]["path"]
    live_path = c["livenessProbe"]["httpGet"]["path"]
    pod = pod_factory({"SHUTDOWN_DRAIN_DELAY": "30", "SHUTDOWN_TIMEOUT": "40"})

    async def status(path: str) -> int:
        async with session.get(pod.base + path) as resp:
            return resp.status

    assert await status(ready_path) == 200
    assert await status(live_path) == 200
    pod.signal(signal.SIGTERM)

    async def draining() -> bool:
        return await status(ready_path) == 503

    await eventually(draining)
    # Liveness must hold while draining, or the kubelet would kill the pod.
    assert await status(live_path) == 200
    pod.signal(signal.SIGTERM)  # a second signal ends the drain delay
    assert pod.wait() == 0


def prestop_seconds(kube: dict[str, Any]) -> float:
    hook = container(kube)["lifecycle"]["preStop"]
    if "sleep" in hook:
        return float(hook["sleep"]["seconds"])
    command = " ".join(hook["exec"]["command"])
    match = re.search(r"sleep\((\d+(?:\.\d+)?)\)", command)
    assert match, command
    return float(match.group(1))


def test_grace_period_covers_prestop_drain_and_shutdown(kube: dict[str, Any]) -> None:
    env = env_values(kube)
    grace = kube["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = setting(env, "SHUTDOWN_DRAIN_DELAY")
    shutdown = setting(env, "SHUTDOWN_TIMEOUT")
    assert grace > prestop_seconds(kube) + drain + shutdown


def test_prestop_hook_and_user_fit_the_image(kube: dict[str, Any]) -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    command = container(kube)["lifecycle"]["preStop"]["exec"]["command"]
    assert f"COPY --from=venv {Path(command[0]).parent.parent}" in dockerfile
    (user,) = re.findall(r"^USER (\d+):(\d+)$", dockerfile, re.MULTILINE)
    context = kube["Deployment"]["spec"]["template"]["spec"]["securityContext"]
    assert context["runAsNonRoot"] is True
    assert (str(context["runAsUser"]), str(context["runAsGroup"])) == user
    assert "EXPOSE 8000" in dockerfile
    assert "/healthz" in dockerfile


def test_resources_and_autoscaler(kube: dict[str, Any]) -> None:
    resources = container(kube)["resources"]
    assert resources["requests"] == {"cpu": "250m", "memory": "256Mi"}
    assert {"cpu", "memory"} <= set(resources["limits"])
    hpa = kube["HorizontalPodAutoscaler"]["spec"]
    target = hpa["scaleTargetRef"]
    deployment = kube["Deployment"]["metadata"]["name"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment)
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["minReplicas"] >= 2


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kustomize_renders_the_manifests() -> None:
    result = subprocess.run(
        ["kubectl", "kustomize", str(KUBE)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    kinds = {doc["kind"] for doc in yaml.safe_load_all(result.stdout)}
    assert "Secret" not in kinds
    assert "Deployment" in kinds


# -- docker compose ----------------------------------------------------------------


def test_compose_file_runs_two_pods_and_redis_on_loopback() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    pods = {name: s for name, s in services.items() if name != "redis"}
    assert len(pods) == 2
    published = set()
    for service in pods.values():
        env = service["environment"]
        assert set(env) - set(SETTINGS) == set()
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        assert (COMPOSE.parent / service["build"]["context"]).resolve() == REPO
        assert (REPO / service["build"]["dockerfile"]).is_file()
        (port,) = service["ports"]
        host, public, inner = port.split(":")
        assert (host, inner) == ("127.0.0.1", "8000")
        published.add(public)
        grace = seconds(service["stop_grace_period"])
        assert grace > setting(env, "SHUTDOWN_DRAIN_DELAY") + setting(env, "SHUTDOWN_TIMEOUT")
        Config.load({k: str(v) for k, v in env.items()}, env_file=None)
    assert published == {"8001", "8002"}
    assert len({s["environment"]["POD_ID"] for s in pods.values()}) == 2


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run(
            [docker, "compose", "version"], capture_output=True, text=True, timeout=30
        )
        if probe.returncode == 0:
            return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_compose_accepts_the_file() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    result = subprocess.run(
        [*command, "-f", str(COMPOSE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


# -- PromQL --------------------------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{([^}]*)\}")
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"(?<![\w.])[A-Za-z_:][\w:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and the label names an expression uses."""
    text = _VARIABLE.sub("", _STRING.sub('""', expr))
    labels = set()
    for body in _MATCHERS.findall(text):
        labels |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body))
    for body in _GROUPING.findall(text):
        labels |= {name.strip() for name in body.split(",") if name.strip()}
    text = _GROUPING.sub(" ", _RANGE.sub(" ", _MATCHERS.sub(" ", text)))
    metrics = set()
    for match in _IDENT.finditer(text):
        rest = text[match.end() :].lstrip()
        if rest.startswith("(") or match.group() in _KEYWORDS:
            continue  # a function or an aggregation, not a series
        metrics.add(match.group())
    return metrics, labels


def test_promql_names_reads_metrics_and_labels() -> None:
    metrics, labels = promql_names(
        'histogram_quantile(0.99, sum by (le, pod) (rate(chat_api_x_bucket{pod=~"$pod",'
        ' code!="1000"}[$__rate_interval]))) / ignoring(code) up offset 5m > bool 0.5'
    )
    assert metrics == {"chat_api_x_bucket", "up"}
    assert labels == {"le", "pod", "code"}


def assert_contract(expr: str) -> set[str]:
    metrics, labels = promql_names(expr)
    unknown = {m for m in metrics if m not in SERIES and not m.startswith("process_")}
    assert not unknown, f"{expr}: not in the metrics contract: {unknown}"
    assert not labels & FORBIDDEN_LABELS, f"{expr}: no room or user labels exist"
    return metrics


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_alert_rules_use_the_contract_and_say_what_is_wrong() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    for rule in rules.values():
        assert_contract(rule["expr"])
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}
        assert rule["annotations"]["summary"]
        assert re.fullmatch(r"\d+[smh]", rule["for"])
    link = rules["ChatApiRedisLinkDown"]
    assert (link["expr"], link["for"]) == ("max by (pod) (chat_api_redis_link_up == 0)", "1m")
    lag = rules["ChatApiDeliveryLagHigh"]
    assert "chat_api_delivery_lag_seconds_bucket" in lag["expr"]
    assert lag["expr"].rstrip().endswith("> 0.5")
    assert lag["for"] == "5m"
    slow = rules["ChatApiSlowConsumerClosesRising"]
    assert "rate(chat_api_slow_consumers_closed_total[5m])" in slow["expr"]
    assert slow["expr"].endswith("> 1")


PROMTOOL = shutil.which("promtool")


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    assert PROMTOOL is not None
    for args in (["check", "rules", ALERTS.name], ["test", "rules", "alerts.test.yml"]):
        result = subprocess.run(
            [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=ALERTS.parent
        )
        assert result.returncode == 0, result.stdout + result.stderr


# -- Grafana -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def test_dashboard_asks_for_a_prometheus_datasource(dashboard: dict[str, Any]) -> None:
    (source,) = dashboard["__inputs"]
    assert (source["name"], source["type"], source["pluginId"]) == (
        "DS_PROMETHEUS",
        "datasource",
        "prometheus",
    )
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    for variable in dashboard["templating"]["list"]:
        assert variable["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert_contract(variable["definition"].removeprefix("label_values(").split(",")[0])


def test_dashboard_uses_only_the_metrics_contract_and_shows_each_concern(
    dashboard: dict[str, Any],
) -> None:
    used = set()
    for expr in dashboard_exprs(dashboard):
        used |= assert_contract(expr)
    shown = {
        "chat_api_connections",
        "chat_api_connections_closed_total",
        "chat_api_frames_received_total",
        "chat_api_messages_published_total",
        "chat_api_deliveries_total",
        "chat_api_delivery_lag_seconds_bucket",
        "chat_api_redis_link_up",
        "chat_api_redis_roundtrip_seconds_bucket",
        "chat_api_errors_sent_total",
        "chat_api_slow_consumers_closed_total",
        "chat_api_rate_limited_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
    }
    assert shown <= used


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_parses_every_dashboard_expression(
    dashboard: dict[str, Any], tmp_path: Path
) -> None:
    assert PROMTOOL is not None
    rules = [
        {
            "record": f"chat_api:dashboard:{i}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$pod", ".*"),
        }
        for i, expr in enumerate(dashboard_exprs(dashboard))
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_a_pod_exposes_every_contract_metric_once_metrics_exist(
    pod: Pod, session: aiohttp.ClientSession
) -> None:
    async with session.get(f"{pod.base}/metrics") as resp:
        if resp.status == 404:
            pytest.skip("this build serves no /metrics yet")
        assert resp.status == 200
        text = await resp.text()
    families = set(re.findall(r"^# TYPE (\S+) \S+$", text, re.MULTILINE))
    samples = set(re.findall(r"^([a-zA-Z_:][\w:]*)", text, re.MULTILINE))
    for name in COUNTERS | GAUGES | HISTOGRAMS:
        assert {name, name.removesuffix("_total")} & (families | samples), name
    assert {"process_resident_memory_bytes", "process_cpu_seconds_total"} <= families
    assert not re.search(r'\b(room|user)="', text)
