"""deploy/kubernetes: every manifest against the Kubernetes schemas, and the manifests against the
daemon's real behaviour (ports, bind address, probes, shutdown budget, image user).

Schemas: ``kubernetes-validate`` ships the OpenAPI schemas of each Kubernetes release and works
offline. It has none for custom resources: the InferencePool (Gateway API Inference Extension)
and HTTPRoute (Gateway API) are checked here for what ties them to the StatefulSet instead.
"""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from corral.daemon.api.app import make_app
from corral.daemon.config import Config
from corral.daemon.gpu import SimulatedProbe
from corral.daemon.models.store import Store
from corral.daemon.serve import SHUTDOWN_BUDGET
from corral.daemon.supervisor import Supervisor

REPO = Path(__file__).resolve().parents[2]
KUBE = REPO / "deploy" / "kubernetes"
VERSIONS = ["1.29.0", kubernetes_validate.utils.latest_version()]
SAFETY = float(os.environ.get("TEST_SAFETY", "30"))
GiB = 1 << 30


def docs(name: str) -> list[dict[str, Any]]:
    with (KUBE / name).open() as f:
        return [d for d in yaml.safe_load_all(f) if d]


def kind(name: str, k: str) -> dict[str, Any]:
    (doc,) = [d for d in docs(name) if d["kind"] == k]
    return doc


def container() -> dict[str, Any]:
    (c,) = kind("statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"]["containers"]
    return c


def json_patch(doc: dict[str, Any], ops: list[dict[str, Any]]) -> dict[str, Any]:
    """RFC 6902 ``add`` (what the GPU overlay uses), JSON-pointer escapes included."""
    for op in ops:
        assert op["op"] == "add", op
        *parents, last = [
            p.replace("~1", "/").replace("~0", "~") for p in op["path"].lstrip("/").split("/")
        ]
        node: Any = doc
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[last] = op["value"]
    return doc


# ---- schemas -----------------------------------------------------------------------------------

CORE = ["configmap.yaml", "statefulset.yaml", "service.yaml"]


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", CORE)
def test_manifests_validate_strictly(name, version):
    for doc in docs(name):
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize("version", VERSIONS)
def test_gpu_overlay_validates(version):
    overlay = yaml.safe_load((KUBE / "gpu" / "kustomization.yaml").read_text())
    assert overlay["resources"] == [".."]
    (patch,) = overlay["patches"]
    assert patch["target"]["kind"] == "StatefulSet" and patch["target"]["name"] == "corral"
    sts = json_patch(kind("statefulset.yaml", "StatefulSet"), yaml.safe_load(patch["patch"]))
    kubernetes_validate.validate(sts, version, strict=True)
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_kustomization_lists_every_core_manifest():
    k = yaml.safe_load((KUBE / "kustomization.yaml").read_text())
    assert sorted(k["resources"]) == sorted(CORE)
    assert sorted(p.name for p in KUBE.glob("*.yaml")) == sorted(
        CORE + ["kustomization.yaml", "inferencepool.yaml", "endpointpicker.yaml"]
    )


@pytest.mark.parametrize("version", VERSIONS)
def test_endpoint_picker_validates_strictly(version):
    kinds = [d["kind"] for d in docs("endpointpicker.yaml")]
    assert sorted(kinds) == sorted(
        ["ServiceAccount", "Role", "RoleBinding", "ConfigMap", "Deployment", "Service"]
    )
    for doc in docs("endpointpicker.yaml"):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_pool_points_at_the_llm_d_routers_endpoint_picker():
    """The picker moved to the llm-d Router: its image, bound to the pool, the Service and the
    plugin config it is started with; its metrics source is where corral serves the names."""
    pool = kind("inferencepool.yaml", "InferencePool")
    svc = kind("endpointpicker.yaml", "Service")
    deploy = kind("endpointpicker.yaml", "Deployment")
    (epp,) = deploy["spec"]["template"]["spec"]["containers"]
    assert epp["image"].startswith("ghcr.io/llm-d/llm-d-router-endpoint-picker:")
    ref = pool["spec"]["endpointPickerRef"]
    assert ref["name"] == svc["metadata"]["name"]
    (grpc,) = [p for p in svc["spec"]["ports"] if p["port"] == ref["port"]["number"]]
    assert grpc["appProtocol"] == "kubernetes.io/h2c"
    assert grpc["targetPort"] in [p["containerPort"] for p in epp["ports"]]
    assert (
        svc["spec"]["selector"].items() <= deploy["spec"]["template"]["metadata"]["labels"].items()
    )
    args = epp["args"]
    assert args[args.index("--pool-name") + 1] == pool["metadata"]["name"]
    assert args[args.index("--pool-group") + 1] == pool["apiVersion"].split("/")[0]
    # the plugin file: mounted from the ConfigMap where --config-file says
    config_file = Path(args[args.index("--config-file") + 1])
    (mount,) = epp["volumeMounts"]
    assert str(config_file.parent) == mount["mountPath"]
    (volume,) = deploy["spec"]["template"]["spec"]["volumes"]
    assert volume["name"] == mount["name"]
    cm = kind("endpointpicker.yaml", "ConfigMap")
    assert volume["configMap"]["name"] == cm["metadata"]["name"]
    plugins = yaml.safe_load(cm["data"][config_file.name])
    types = [p["type"] for p in plugins["plugins"]]
    assert {"queue-scorer", "kv-cache-utilization-scorer", "prefix-cache-scorer"} <= set(types)
    assert "core-metrics-extractor" in types  # vllm names by default: corral's
    (source,) = [p for p in plugins["plugins"] if p["type"] == "metrics-data-source"]
    assert source["parameters"]["path"] == "/metrics"
    refs = {p["pluginRef"] for prof in plugins["schedulingProfiles"] for p in prof["plugins"]}
    assert refs <= set(types)
    # RBAC: the picker's account may watch the pool's pods and the pool
    sa = kind("endpointpicker.yaml", "ServiceAccount")
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    binding = kind("endpointpicker.yaml", "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"]}]
    rules = kind("endpointpicker.yaml", "Role")["rules"]
    granted = {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}
    assert {("", "pods"), ("inference.networking.k8s.io", "inferencepools")} <= granted


def test_custom_resources_have_no_bundled_schema_and_match_the_statefulset():
    pool = kind("inferencepool.yaml", "InferencePool")
    route = kind("inferencepool.yaml", "HTTPRoute")
    for doc in (pool, route):
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, VERSIONS[-1], strict=True)
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    pod_labels = kind("statefulset.yaml", "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    assert pool["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    port = container()["ports"][0]["containerPort"]
    assert pool["spec"]["targetPorts"] == [{"number": port}]
    assert set(pool["spec"]["endpointPickerRef"]) <= {
        "name",
        "port",
        "failureMode",
        "kind",
        "group",
    }
    (rule,) = route["spec"]["rules"]
    assert rule["backendRefs"] == [
        {
            "group": "inference.networking.k8s.io",
            "kind": "InferencePool",
            "name": pool["metadata"]["name"],
        }
    ]


# ---- agreement with the daemon -----------------------------------------------------------------


def test_ports_and_bind_address_agree_with_the_daemon():
    env = kind("configmap.yaml", "ConfigMap")["data"]
    cfg = Config.from_env(env)  # the daemon's own parser of these variables
    c = container()
    (port,) = c["ports"]
    assert cfg.bind_port == port["containerPort"] == 11434
    # Not loopback: probes and Services reach the pod IP (and the Host-header check, which only
    # applies to a loopback bind, would refuse their Host headers).
    assert cfg.bind_host in ("0.0.0.0", "")
    assert c["envFrom"] == [{"configMapRef": {"name": "corral"}}]
    mount = c["volumeMounts"][0]["mountPath"]
    assert str(cfg.models).startswith(mount + "/")
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"]["port"] == port["name"]
    for svc in docs("service.yaml"):
        (p,) = svc["spec"]["ports"]
        assert p["targetPort"] == port["name"] and p["port"] == port["containerPort"]
        assert (
            svc["spec"]["selector"].items()
            <= kind("statefulset.yaml", "StatefulSet")["spec"]["template"]["metadata"][
                "labels"
            ].items()
        )
    annotations = kind("statefulset.yaml", "StatefulSet")["spec"]["template"]["metadata"][
        "annotations"
    ]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_grace_period_covers_prestop_and_the_shutdown_budget():
    spec = kind("statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"]
    pre = container()["lifecycle"]["preStop"]["exec"]["command"]
    assert pre[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > int(pre[1]) + SHUTDOWN_BUDGET


def test_image_installs_with_the_readme_command_and_runs_as_the_pod_user():
    text = (KUBE / "Dockerfile").read_text()
    assert "./dev install" in (REPO / "README.md").read_text()
    assert re.search(r"^RUN .*\./dev install", text, re.M)
    assert re.search(r"^COPY \. /opt/corral$", text, re.M)
    assert re.search(r'^ENTRYPOINT \["/opt/corral/\.venv/bin/corral"\]$', text, re.M)
    assert re.search(r'^CMD \["serve"\]$', text, re.M)
    port = container()["ports"][0]["containerPort"]
    assert re.search(rf"^EXPOSE {port}$", text, re.M)
    uid = int(re.search(r"useradd .*--uid (\d+)", text).group(1))
    assert re.search(rf"^USER {uid}$", text, re.M)
    sec = kind("statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"]["securityContext"]
    assert sec["runAsUser"] == sec["fsGroup"] == uid
    assert container()["args"] == ["serve"]


def test_pod_runs_read_only_unprivileged_and_writes_only_to_its_volumes():
    """Read-only root filesystem, no privilege escalation, no capabilities, non-root, the
    runtime's seccomp profile; and every place the daemon writes (its store, HOME's caches,
    temporary files) is a mounted volume, not the image."""
    pod = kind("statefulset.yaml", "StatefulSet")["spec"]["template"]["spec"]
    c = container()
    sec = c["securityContext"]
    assert sec["readOnlyRootFilesystem"] is True
    assert sec["allowPrivilegeEscalation"] is False and sec["privileged"] is False
    assert sec["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False

    volumes = {v["name"]: v for v in pod["volumes"]}
    claims = {
        t["metadata"]["name"]
        for t in kind("statefulset.yaml", "StatefulSet")["spec"]["volumeClaimTemplates"]
    }
    mounts = [m["mountPath"] for m in c["volumeMounts"] if m["name"] in volumes.keys() | claims]
    assert len(mounts) == len(c["volumeMounts"])
    image_env = dict(
        re.findall(
            r"(\w+)=(\S+)", (KUBE / "Dockerfile").read_text().split("ENV ", 1)[1].split("EXPOSE")[0]
        )
    )
    cfg = Config.from_env({**image_env, **kind("configmap.yaml", "ConfigMap")["data"]})
    written = [cfg.models, cfg.cache_dir, Path(image_env["HOME"]), Path("/tmp")]
    for path in written:
        assert path is not None
        assert any(str(path) == m or str(path).startswith(m + "/") for m in mounts), path


async def test_probe_endpoints_behave_as_the_manifest_expects(tmp_path, tiny_gguf):
    """/ is live at once; /readyz is 503 until the start-up preload has loaded the model, 200
    then, and 503 again as soon as shutdown begins (the replica leaves the endpoints)."""
    c = container()
    ready_path = c["readinessProbe"]["httpGet"]["path"]
    live_path = c["livenessProbe"]["httpGet"]["path"]
    store = Store(tmp_path / "models")
    layer = await store.write_blob_bytes(tiny_gguf.read_bytes())
    await store.create("tiny", files={"m.gguf": layer.digest})
    cfg = Config(runner_engine="fake", fake_knobs={"load_time": 0.3}, keep_alive=-1.0)
    sup = Supervisor(
        cfg,
        store,
        probe=SimulatedProbe((), host=(64 * GiB, 48 * GiB)),
        stop_grace=2.0,
        drain_timeout=1.0,
    )
    await sup.start()
    client = TestClient(TestServer(make_app(cfg, store, sup), host="127.0.0.1"))
    await client.start_server()
    try:
        async with client.get(live_path) as r:
            assert r.status == 200 and await r.text() == "Ollama is running"
        async with client.get(ready_path) as r:
            assert r.status == 503
        preload = asyncio.create_task(sup.preload_default("tiny"))
        await asyncio.wait_for(sup.wait_until(lambda: sup.snapshot().runners != ()), SAFETY)
        async with client.get(ready_path) as r:  # loading (0.3 s load)
            assert r.status == 503 and (await r.json())["status"] == "loading"
        await asyncio.wait_for(preload, SAFETY)
        async with client.get(ready_path) as r:
            assert r.status == 200 and (await r.json())["status"] == "ready"
        await sup.begin_shutdown()
        async with client.get(ready_path) as r:
            assert r.status == 503 and (await r.json())["status"] == "shutting down"
        async with client.get(live_path) as r:
            assert r.status == 200
    finally:
        await client.close()
        await asyncio.wait_for(sup.close(), SAFETY)
