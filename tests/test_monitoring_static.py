"""Static checks of monitoring/ and the deployment files (no server, no Docker, no cluster).

- Prometheus: `promtool check config`, `promtool check rules` and `promtool test rules`
  (the alert unit tests in monitoring/prometheus/tests/), plus: every alert has a test
  where it fires and one where it stays silent, a severity and both annotations.
- Names: every metric a rule or a dashboard panel reads is in the gateway's catalogue
  (`service.metrics.Metrics`) or among the installed vLLM's own `vllm:*` collectors, and
  every recording-rule name an alert reads is recorded.
- Grafana: every panel has a query, queries parse (promtool, variables filled in) and use
  only the documented variables, and the provisioning matches compose.yaml.
- Deployment: the Dockerfile, compose.yaml (+ compose.gpu.yaml) and deploy/k8s/ parse
  and agree with each other and with monitoring/ (paths, ports, targets, labels).
  Docker, compose and Kubernetes themselves cannot run here: see README.

promtool comes from Debian's `prometheus` package, which `make test` installs
(Makefile `system-deps`); without it these tests fail, as the redis tests do.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.metrics import Metrics

REPO = Path(__file__).resolve().parents[1]
PROM = REPO / "monitoring" / "prometheus"
PROM_CONFIG = PROM / "prometheus.yml"
PROM_K8S_CONFIG = PROM / "prometheus-k8s.yml"
RULES = PROM / "rules"
RULE_FILES = [RULES / "recording.yml", RULES / "alerts.yml"]
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
GRAFANA = REPO / "monitoring" / "grafana"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))
COMPOSE = REPO / "compose.yaml"
COMPOSE_GPU = REPO / "compose.gpu.yaml"
K8S = REPO / "deploy" / "k8s"
DOCKERFILE = REPO / "Dockerfile"

#: The alerts issue 7 asks for: P95 > 100 ms for 5 min, P99 > 500 ms, error ratio > 1%,
#: fallback ratio > 2%, a target down (and no gateway target at all), gateway not ready.
EXPECTED_ALERTS = {
    "FastrespLatencyP95High",
    "FastrespLatencyP99High",
    "FastrespErrorRatioHigh",
    "FastrespFallbackRatioHigh",
    "FastrespTargetDown",
    "FastrespGatewayTargetMissing",
    "FastrespGatewayNotReady",
}
SEVERITIES = {"critical", "warning"}

#: The only Grafana variables panel queries may use (README documents them): the
#: personality regex, and Grafana's built-in rate interval.
DASHBOARD_VARIABLES = {"personality", "__rate_interval", "__interval"}
BUILTIN_VARIABLES = {"__rate_interval", "__interval"}
#: What a test fills the variables with to parse the queries.
VARIABLE_VALUES = {"personality": ".*", "__rate_interval": "1m", "__interval": "15s"}

IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")


def _yaml(path: Path) -> Any:
    with path.open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as handle:
        return [doc for doc in yaml.safe_load_all(handle) if doc]


@pytest.fixture(scope="module")
def promtool() -> str:
    """The promtool binary (Debian package `prometheus`)."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail(
            "promtool is not installed; `make test` installs it "
            "(apt-get install -y --no-install-recommends prometheus)"
        )
    return binary


def _run(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(arg) for arg in args], capture_output=True, text=True, timeout=120, check=False
    )


def _assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )


# ---- Prometheus: promtool ---------------------------------------------------------------


def test_promtool_check_config(promtool: str) -> None:
    """The compose Prometheus config, with the rule files it loads."""
    result = _run(promtool, "check", "config", PROM_CONFIG)
    _assert_ok(result)
    assert "2 rule files found" in result.stdout, result.stdout


def test_promtool_check_k8s_config(promtool: str, tmp_path: Path) -> None:
    """The in-cluster config. Debian's promtool is built without Kubernetes service
    discovery, so `kubernetes_sd_configs` is swapped for a static target for the check;
    everything else (relabelling regexes, rule files beside it, as in the ConfigMap) is
    checked as is."""
    config = _yaml(PROM_K8S_CONFIG)
    for job in config["scrape_configs"]:
        assert [sd["role"] for sd in job.pop("kubernetes_sd_configs")] == ["pod"], job
        job["static_configs"] = [{"targets": ["10.0.0.1:8000"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    for rule_file in RULE_FILES:
        shutil.copy(rule_file, tmp_path / rule_file.name)
    result = _run(promtool, "check", "config", tmp_path / "prometheus.yml")
    _assert_ok(result)
    assert "2 rule files found" in result.stdout, result.stdout


def test_promtool_check_rules(promtool: str) -> None:
    _assert_ok(_run(promtool, "check", "rules", *RULE_FILES))


def test_promtool_test_rules(promtool: str) -> None:
    """The alert and recording-rule unit tests (monitoring/prometheus/tests/)."""
    assert RULE_TESTS, "no promtool test files in monitoring/prometheus/tests/"
    result = _run(promtool, "test", "rules", *RULE_TESTS)
    _assert_ok(result)
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS), result.stdout


def test_prometheus_configs_load_the_rule_files() -> None:
    expected = {path.name for path in RULE_FILES}
    assert {Path(p).name for p in _yaml(PROM_CONFIG)["rule_files"]} == expected
    assert set(_yaml(PROM_K8S_CONFIG)["rule_files"]) == expected
    for config in (PROM_CONFIG, PROM_K8S_CONFIG):
        jobs = {job["job_name"] for job in _yaml(config)["scrape_configs"]}
        assert {"fastresp-gateway", "vllm"} <= jobs, (config, jobs)


# ---- Prometheus: the rules themselves ---------------------------------------------------


def _rules(path: Path) -> list[dict[str, Any]]:
    return [rule for group in _yaml(path)["groups"] for rule in group["rules"]]


def _alerts() -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for rule in _rules(RULES / "alerts.yml")}


def _recorded() -> set[str]:
    return {rule["record"] for rule in _rules(RULES / "recording.yml")}


def test_the_issue_alerts_exist_with_severity_and_annotations() -> None:
    alerts = _alerts()
    assert set(alerts) == EXPECTED_ALERTS
    for name, rule in alerts.items():
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        for key in ("summary", "description"):
            assert str(annotations.get(key, "")).strip(), f"{name}: no {key}"


def test_every_alert_fires_in_one_test_and_stays_silent_in_another() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for path in RULE_TESTS:
        for test in _yaml(path)["tests"]:
            for case in test.get("alert_rule_test", []):
                (fires if case.get("exp_alerts") else silent).add(case["alertname"])
    alerts = set(_alerts())
    assert alerts - fires == set(), "alerts never shown firing"
    assert alerts - silent == set(), "alerts never shown silent"
    assert (fires | silent) - alerts == set(), "tests of alerts that do not exist"


def test_recording_rules_cover_quantiles_rates_and_ratios() -> None:
    recorded = _recorded()
    expected = {
        f"{level}:fastresp_request_duration_seconds:{q}_{window}"
        for level in ("personality", "job")
        for q in ("p50", "p95", "p99")
        for window in ("1m", "5m")
    }
    for window in ("1m", "5m"):
        for level in ("personality", "job"):
            expected |= {
                f"{level}:fastresp_requests:rate{window}",
                f"{level}:fastresp_requests_server_error:ratio_rate{window}",
                f"{level}:fastresp_fallbacks:ratio_rate{window}",
            }
    # the canary comparison: stable and canary version side by side
    expected |= {
        "personality_version:fastresp_request_duration_seconds:p95_5m",
        "personality_version:fastresp_fallbacks:ratio_rate5m",
        "personality_version:fastresp_requests:rate5m",
    }
    assert expected - recorded == set()
    # the level names the labels the rule keeps (level:metric:operation)
    kept = {"personality": "personality", "job": "job"}
    kept["personality_version"] = "personality, adapter_version"
    for rule in _rules(RULES / "recording.yml"):
        level = rule["record"].split(":")[0]
        assert f"by ({kept[level]}" in rule["expr"], rule["record"]


# ---- metric names -----------------------------------------------------------------------


def _catalogue() -> set[str]:
    """Every series name the gateway's collectors can expose."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_sum", "_count", "_created"),
            "summary": ("", "_sum", "_count", "_created"),
            "info": ("_info",),
        }.get(family.type, ("",))
        names |= {family.name + suffix for suffix in suffixes}
    return names


def _vllm_catalogue() -> set[str]:
    """Every `vllm:*` series name of the installed vLLM's v1 metrics (read from its
    source, without importing it)."""
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations, "vLLM is not installed"
    names: set[str] = set()
    pattern = re.compile(r'_(gauge|counter|histogram)_cls\(\s*name="(vllm:[A-Za-z0-9_:]+)"')
    for root in spec.submodule_search_locations:
        for source in (Path(root) / "v1").rglob("*.py"):
            for kind, name in pattern.findall(source.read_text(encoding="utf-8")):
                suffixes = {
                    "counter": ("_total",),
                    "histogram": ("_bucket", "_sum", "_count"),
                }.get(kind, ("",))
                names |= {name.removesuffix("_total") + suffix for suffix in suffixes}
    assert "vllm:num_requests_waiting" in names, "vLLM's metric source was not found"
    return names


def _identifiers(expr: str) -> set[str]:
    """Metric and recording-rule names in a PromQL expression: strings, label matchers
    and range durations are removed first."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    return set(IDENTIFIER.findall(expr))


def _dashboard_targets() -> Iterator[tuple[str, str, dict[str, Any]]]:
    """(dashboard file, panel title, target) for every panel target of every dashboard,
    rows' nested panels included."""
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        for panel in _panels(dashboard):
            for target in panel.get("targets", []):
                yield path.name, panel.get("title", ""), target


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _all_exprs() -> list[tuple[str, str]]:
    """(where, expr) for every rule and dashboard query, and the variable queries."""
    exprs = [
        (f"rules/{path.name}: {rule.get('record') or rule.get('alert')}", rule["expr"])
        for path in RULE_FILES
        for rule in _rules(path)
    ]
    exprs += [(f"{name}: {title}", target["expr"]) for name, title, target in _dashboard_targets()]
    for path in DASHBOARDS:
        for variable in json.loads(path.read_text(encoding="utf-8"))["templating"]["list"]:
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query or "")
            match = re.fullmatch(r"\s*label_values\((.+),\s*\w+\)\s*", text)
            if match:
                exprs.append((f"{path.name}: variable {variable['name']}", match.group(1)))
    return exprs


def test_every_metric_read_exists() -> None:
    """fastresp_* names in the gateway's catalogue, vllm:* names in vLLM's, and
    level:metric:operation names among the recording rules."""
    catalogue, vllm, recorded = _catalogue(), _vllm_catalogue(), _recorded()
    unknown: list[str] = []
    for where, expr in _all_exprs():
        for name in _identifiers(expr):
            if name.startswith("fastresp_"):
                known = name in catalogue
            elif name.startswith("vllm:"):
                known = name in vllm
            elif ":" in name:
                known = name in recorded
            else:
                continue  # functions, keywords, label names, `up`
            if not known:
                unknown.append(f"{where}: {name}")
    assert unknown == []


def test_name_check_catches_a_typo() -> None:
    """The extraction above sees the names it must check."""
    expr = 'sum by (le) (rate(fastresp_request_duration_secondz_bucket{source="model"}[5m]))'
    assert "fastresp_request_duration_secondz_bucket" in _identifiers(expr)
    assert "fastresp_request_duration_secondz_bucket" not in _catalogue()
    assert "vllm:time_to_first_token_seconds_bucket" in _vllm_catalogue()
    assert "model" not in _identifiers(expr)


# ---- Grafana ----------------------------------------------------------------------------


def test_dashboards_exist_and_every_panel_has_a_query() -> None:
    assert [path.name for path in DASHBOARDS] == ["fastresp-gateway.json"]
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        assert dashboard["uid"] and dashboard["title"]
        panels = [p for p in _panels(dashboard) if p.get("type") != "row"]
        assert len(panels) >= 10, path.name
        ids = [p["id"] for p in _panels(dashboard)]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
        for panel in panels:
            exprs = [t.get("expr", "").strip() for t in panel.get("targets", [])]
            assert exprs and all(exprs), f"{path.name}: panel {panel.get('title')!r}"
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs)), panel.get("title")


def test_dashboard_shows_what_the_issue_lists() -> None:
    exprs = " ".join(target["expr"] for _, _, target in _dashboard_targets())
    for needle in (
        "fastresp_requests_total",  # RPS
        "histogram_quantile(0.5, sum by (le) (rate(fastresp_request_duration_seconds_bucket",
        "histogram_quantile(0.95, sum by (le) (rate(fastresp_request_duration_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(fastresp_request_duration_seconds_bucket",
        'outcome="server_error"',
        "fastresp_fallbacks_total",
        "fastresp_cache_lookups_total",
        'fastresp_request_duration_seconds_bucket{personality=~"$personality"}',
        "fastresp_active_adapter_info",
        "fastresp_adapter_swaps_total",
        "vllm:time_to_first_token_seconds_bucket",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ):
        assert needle in exprs, needle
    # the 100 ms SLO line on the overall latency panel
    dashboard = json.loads(DASHBOARDS[0].read_text(encoding="utf-8"))
    slo_panels = [
        p
        for p in _panels(dashboard)
        if any(
            s.get("value") == 0.1
            for s in p.get("fieldConfig", {})
            .get("defaults", {})
            .get("thresholds", {})
            .get("steps", [])
        )
        and p.get("fieldConfig", {}).get("defaults", {}).get("custom", {}).get("thresholdsStyle")
        == {"mode": "line"}
    ]
    assert slo_panels, "no panel draws the 100 ms SLO line"


def test_dashboard_variables_are_the_documented_ones() -> None:
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        defined = {v["name"] for v in dashboard["templating"]["list"]}
        used: set[str] = set()
        for _, _, target in _dashboard_targets():
            used |= {a or b for a, b in VARIABLE.findall(target["expr"])}
        assert used <= DASHBOARD_VARIABLES, used - DASHBOARD_VARIABLES
        assert used - BUILTIN_VARIABLES <= defined, (used, defined)
        assert "personality" in used and "personality" in defined


def _fill(expr: str) -> str:
    return VARIABLE.sub(lambda m: VARIABLE_VALUES[m.group(1) or m.group(2)], expr)


def test_dashboard_queries_parse(promtool: str, tmp_path: Path) -> None:
    """Every panel query, variables filled in, through promtool's PromQL parser (as
    recording rules of a throwaway rule file)."""
    targets = list(_dashboard_targets())
    rules = [
        {"record": f"dashboard:query_{i}:check", "expr": _fill(target["expr"])}
        for i, (_, _, target) in enumerate(targets)
    ]
    rule_file = tmp_path / "dashboard_queries.yml"
    rule_file.write_text(
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8"
    )
    result = _run(promtool, "check", "rules", rule_file)
    _assert_ok(result)
    assert f"{len(rules)} rules found" in result.stdout


def test_query_parse_check_can_fail(promtool: str, tmp_path: Path) -> None:
    rule_file = tmp_path / "broken.yml"
    broken = {"record": "x:y:z", "expr": "sum(rate(fastresp_requests_total[$__rate_interval]))"}
    rule_file.write_text(
        yaml.safe_dump({"groups": [{"name": "g", "rules": [broken]}]}), encoding="utf-8"
    )
    assert _run(promtool, "check", "rules", rule_file).returncode != 0


def test_grafana_provisioning_matches_compose_and_dashboards() -> None:
    datasources = _yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    services = _yaml(COMPOSE)["services"]
    assert re.fullmatch(r"http://prometheus:9090/?", source["url"])
    assert "prometheus" in services and "9090:9090" in services["prometheus"]["ports"]
    for _, title, target in _dashboard_targets():
        assert target["datasource"]["uid"] == source["uid"], title

    providers = _yaml(GRAFANA / "provisioning" / "dashboards" / "dashboards.yml")["providers"]
    mounts = _bind_mounts(services["grafana"])
    paths = {provider["options"]["path"] for provider in providers}
    assert paths == {mounts[GRAFANA / "dashboards"]}
    assert mounts[GRAFANA / "provisioning"] == "/etc/grafana/provisioning"


# ---- compose ----------------------------------------------------------------------------


def _bind_mounts(service: dict[str, Any]) -> dict[Path, str]:
    """Host path (resolved from the repository root) -> container path, for the
    service's `./...` bind mounts."""
    mounts: dict[Path, str] = {}
    for volume in service.get("volumes", []):
        source, target = str(volume).split(":")[:2]
        if source.startswith("."):
            mounts[(REPO / source).resolve()] = target
    return mounts


def _command_port(command: list[str]) -> int:
    return int(command[command.index("--port") + 1])


def test_compose_services_build_mounts_and_wiring() -> None:
    compose = _yaml(COMPOSE)
    services = compose["services"]
    assert set(services) == {"gateway", "engine", "redis", "prometheus", "grafana"}

    for name in ("gateway", "engine"):
        build = services[name]["build"]
        assert (REPO / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
        assert services[name]["image"] == services["gateway"]["image"]
    assert services["engine"]["command"][:3] == ["fastresp", "engine", "serve"]
    assert services["gateway"]["command"] == ["fastresp", "serve"]

    declared = set(compose.get("volumes", {}))
    for name, service in services.items():
        for path in _bind_mounts(service):
            assert path.exists(), f"{name} mounts {path}, which does not exist"
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if not source.startswith((".", "/", "$")):
                assert source in declared, f"{name}: volume {source} not declared"
        for dependency in service.get("depends_on", []):
            assert dependency in services, f"{name} depends on unknown {dependency}"

    # gateway -> engine -> the vllm scrape target; gateway -> redis
    env = services["gateway"]["environment"]
    engine_port = _command_port(services["engine"]["command"])
    assert env["FASTRESP_ENGINE_URLS"] == f"http://engine:{engine_port}"
    assert env["FASTRESP_REDIS_URL"].startswith("redis://redis:6379/")
    assert env["FASTRESP_PORT"] == "8000" and "8000:8000" in services["gateway"]["ports"]
    assert f"{engine_port}/health" in " ".join(services["engine"]["healthcheck"]["test"])
    assert services["gateway"]["depends_on"]["engine"]["condition"] == "service_healthy"

    # Prometheus gets monitoring/prometheus at /etc/prometheus and scrapes both services
    assert _bind_mounts(services["prometheus"])[PROM] == "/etc/prometheus"
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    targets = {
        job["job_name"]: [t for sc in job["static_configs"] for t in sc["targets"]]
        for job in _yaml(PROM_CONFIG)["scrape_configs"]
    }
    assert targets["fastresp-gateway"] == ["gateway:8000"]
    assert targets["vllm"] == [f"engine:{engine_port}"]


def test_compose_gpu_override() -> None:
    base = _yaml(COMPOSE)["services"]
    gpu = _yaml(COMPOSE_GPU)["services"]
    assert set(gpu) <= set(base)
    devices = gpu["engine"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    for name in ("engine", "gateway"):
        assert gpu[name]["build"]["args"]["EXTRAS"] == "gpu"
        assert gpu[name]["environment"]["FASTRESP_MODEL"] == "/models/base"
    assert gpu["gateway"]["environment"]["FASTRESP_ENGINE_DEVICE"] == "cuda"


# ---- Kubernetes -------------------------------------------------------------------------


def _k8s() -> list[dict[str, Any]]:
    kustomization = _yaml(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    on_disk = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk, "kustomization.yaml and deploy/k8s/ disagree"
    docs: list[dict[str, Any]] = []
    for name in listed:
        docs += _yaml_docs(K8S / name)
    for doc in docs:
        assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"]["name"], doc
    return docs


def _named(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_k8s_manifests_kinds_and_selectors() -> None:
    docs = _k8s()
    deployments = _named(docs, "Deployment")
    services = _named(docs, "Service")
    assert {"fastresp-gateway", "fastresp-vllm", "fastresp-redis"} <= set(deployments)
    assert {"fastresp-gateway", "fastresp-vllm", "fastresp-redis"} <= set(services)

    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= labels.items(), name
    for name, service in services.items():
        matches = [
            d
            for d in deployments.values()
            if service["spec"]["selector"].items()
            <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"Service {name} selects {len(matches)} Deployments"
        port_names = {p["name"] for p in _container(matches[0]).get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, (name, port)

    (hpa,) = _named(docs, "HorizontalPodAutoscaler").values()
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "fastresp-gateway",
    }
    assert 1 < hpa["spec"]["minReplicas"] < hpa["spec"]["maxReplicas"]
    assert "replicas" not in deployments["fastresp-gateway"]["spec"], "the HPA owns replicas"

    claims = set(_named(docs, "PersistentVolumeClaim"))
    config_maps = set(_named(docs, "ConfigMap"))
    for name, deployment in deployments.items():
        for volume in deployment["spec"]["template"]["spec"].get("volumes", []):
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        for source in _container(deployment).get("envFrom", []):
            assert source["configMapRef"]["name"] in config_maps, name


def test_k8s_gpu_probes_and_scrape_annotations() -> None:
    docs = _k8s()
    deployments = _named(docs, "Deployment")
    gateway, vllm = deployments["fastresp-gateway"], deployments["fastresp-vllm"]

    resources = _container(vllm)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in _container(gateway).get("resources", {}).get("limits", {})
    assert _container(vllm)["command"][:3] == ["fastresp", "engine", "serve"]

    container = _container(gateway)
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert _container(vllm)["readinessProbe"]["httpGet"]["path"] == "/health"

    k8s_config = _yaml(PROM_K8S_CONFIG)
    component_of_job = {
        job["job_name"]: next(
            rule["regex"]
            for rule in job["relabel_configs"]
            if rule["source_labels"] == ["__meta_kubernetes_pod_label_app_kubernetes_io_component"]
        )
        for job in k8s_config["scrape_configs"]
    }
    for job, deployment in (("fastresp-gateway", gateway), ("vllm", vllm)):
        template = deployment["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/path"] == "/metrics"
        ports = {str(p["containerPort"]) for p in _container(deployment)["ports"]}
        assert annotations["prometheus.io/port"] in ports
        labels = template["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "pika-fast-response"
        assert re.fullmatch(component_of_job[job], labels["app.kubernetes.io/component"])

    # the gateway's engine URL is the vLLM Service
    config = _named(docs, "ConfigMap")["fastresp-gateway"]["data"]
    (vllm_port,) = _named(docs, "Service")["fastresp-vllm"]["spec"]["ports"]
    assert config["FASTRESP_ENGINE_URLS"] == f"http://fastresp-vllm:{vllm_port['port']}"
    assert config["FASTRESP_REDIS_URL"].startswith("redis://fastresp-redis:6379/")


def test_k8s_checks_can_fail() -> None:
    """A Service whose selector matches no Deployment is caught by the same rule."""
    deployments = _named(_k8s(), "Deployment")
    service = copy.deepcopy(_named(_k8s(), "Service")["fastresp-gateway"])
    service["spec"]["selector"] = {"app.kubernetes.io/name": "no-such-app"}
    assert not [
        d
        for d in deployments.values()
        if service["spec"]["selector"].items()
        <= d["spec"]["template"]["metadata"]["labels"].items()
    ]


# ---- Dockerfile -------------------------------------------------------------------------


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", text)
    result = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_dockerfile_multi_stage_non_root_healthcheck_and_same_install() -> None:
    steps = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    froms = [args for keyword, args in steps if keyword == "FROM"]
    assert len(froms) >= 2 and froms[0].endswith(" AS build"), froms
    final = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    users = [args for keyword, args in steps[final:] if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    assert any(k == "COPY" and "--from=build" in a for k, a in steps[final:])

    (healthcheck,) = [args for keyword, args in steps if keyword == "HEALTHCHECK"]
    assert "/healthz" in healthcheck
    # exec form: Docker runs an array that is not valid JSON through a shell instead
    for keyword, args in steps:
        if keyword in ("CMD", "ENTRYPOINT", "HEALTHCHECK"):
            command = re.split(r"\s+CMD\s+", args, maxsplit=1)[-1].strip()
            if command.startswith("["):
                assert isinstance(json.loads(command), list), args
    assert any(k == "ARG" and a.startswith("EXTRAS=cpu") for k, a in steps)
    runs = " ".join(args for keyword, args in steps if keyword == "RUN")
    assert 'make install EXTRAS="${EXTRAS}"' in runs  # the README's install step
    assert "fastresp model prepare" in runs

    ignored = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".git", ".venv"} <= ignored
    for keyword, args in steps:
        if keyword == "COPY" and "--from=" not in args:
            *sources, _ = args.split()
            for source in sources:
                assert (REPO / source).exists(), source
                assert source.rstrip("/") not in ignored, f"{source} is in .dockerignore"
