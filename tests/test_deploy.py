"""deploy/kubernetes: every overlay renders with kustomize (`kubectl kustomize`, or a `kustomize` binary) and
validates: Kubernetes' own kinds against the API's schemas (kubernetes-validate, offline, strict: unknown fields
fail), KEDA's against deploy/kubernetes/schemas/keda.yaml; then what the stack needs of them (one KEDA trigger
per queue shard, summed by the formula; probes; GPUs; grace periods)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from imgserve.protocol.keys import shard_keys

pytestmark = pytest.mark.unit

KUBE = Path(__file__).resolve().parent.parent / "deploy" / "kubernetes"
OVERLAYS = ("cpu", "gpu", "cluster")
KEDA_SCHEMAS = yaml.safe_load((KUBE / "schemas" / "keda.yaml").read_text())
KUBERNETES_VERSION = "1.30.0"  # the oldest minor still supported by the major clouds when this was written


def kustomize_command() -> list[str]:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.skip("neither kustomize nor kubectl is installed: the manifests cannot be rendered")


def render(overlay: str) -> dict[tuple[str, str], dict]:
    """The overlay's resources, by (kind, name)."""
    text = subprocess.run(
        [*kustomize_command(), str(KUBE / "overlays" / overlay)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in yaml.safe_load_all(text) if doc}


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, dict[tuple[str, str], dict]]:
    return request.param, render(request.param)


def test_every_resource_validates_against_its_schema(rendered):
    _, resources = rendered
    assert {kind for kind, _ in resources} >= {"Deployment", "Service", "HorizontalPodAutoscaler", "ScaledObject"}
    for (kind, _), doc in resources.items():
        if kind in KEDA_SCHEMAS:
            jsonschema.validate(doc, KEDA_SCHEMAS[kind])
        else:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def settings_of(resources: dict) -> dict[str, str]:
    return next(doc["data"] for (kind, _), doc in resources.items() if kind == "ConfigMap")


def test_keda_has_one_trigger_per_queue_shard_and_level_summed_by_the_formula(rendered):
    overlay, resources = rendered
    config = settings_of(resources)
    scaled = resources[("ScaledObject", "imgserve-worker")]["spec"]
    triggers = scaled["triggers"]
    shards = shard_keys(config["IMAGE_QUEUE"], int(config["QUEUE_SHARDS"]), tagged=True)
    lists = [name for keys in shards for name in keys.levels.values()]  # every priority level counts
    assert sorted(t["metadata"]["listName"] for t in triggers) == sorted(lists)
    assert {t["type"] for t in triggers} == {"redis-cluster" if overlay == "cluster" else "redis"}
    formula = scaled["advanced"]["scalingModifiers"]["formula"]
    assert sorted(term.strip() for term in formula.split("+")) == sorted(t["name"] for t in triggers)
    assert scaled["scaleTargetRef"]["name"] in {name for kind, name in resources if kind == "Deployment"}


def test_web_probes_grace_periods_and_disruption_budgets(rendered):
    _, resources = rendered
    web = resources[("Deployment", "imgserve-web")]["spec"]["template"]["spec"]
    probes = web["containers"][0]
    assert probes["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/healthz"
    timeout = float(settings_of(resources)["REQUEST_TIMEOUT"])
    assert web["terminationGracePeriodSeconds"] > timeout  # requests in flight are answered
    worker = resources[("Deployment", "imgserve-worker")]["spec"]["template"]["spec"]
    assert worker["terminationGracePeriodSeconds"] > timeout  # the batch in hand is published
    for name in ("imgserve-web", "imgserve-worker"):
        pods = resources[("Deployment", name)]["spec"]["template"]["metadata"]["labels"]
        budget = resources[("PodDisruptionBudget", name)]["spec"]["selector"]["matchLabels"]
        assert budget.items() <= pods.items()


def test_only_the_gpu_overlay_asks_for_gpus(rendered):
    overlay, resources = rendered
    container = resources[("Deployment", "imgserve-worker")]["spec"]["template"]["spec"]["containers"][0]
    limits = container["resources"].get("limits", {})
    assert ("nvidia.com/gpu" in limits) == (overlay == "gpu")
    assert container["image"].endswith(":gpu") == (overlay == "gpu")


def test_the_containers_take_an_api_keys_that_compose_passes_empty_as_not_set(monkeypatch, capsys):
    """compose.yaml lists API_KEYS, so it arrives empty when .env leaves it out: the container must start
    (open, as without it), while the settings still refuse an empty API_KEYS elsewhere."""
    from imgserve import settings
    from imgserve.launch import container
    from imgserve.launch.local_redis import free_port

    monkeypatch.setenv("API_KEYS", "")
    monkeypatch.setenv("WEB_PORT", str(free_port()))
    monkeypatch.setenv("METRICS_PORT", str(free_port()))  # whichever role an earlier run left in ROLE_FILE
    with pytest.raises(settings.SettingsError, match="API_KEYS"):
        settings.load(dotenv=False)
    assert container.main(["healthcheck"]) == 1  # settings fine; nothing listens on that port
    assert "configuration error" not in capsys.readouterr().err
