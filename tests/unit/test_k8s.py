"""KubeRay manifests validated offline: custom resources against the KubeRay CRD schemas
(with unknown fields rejected, as the API server's strict field validation does), core
objects against Kubernetes' schemas, and cross-checks between the files."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import jsonschema
import pytest
import yaml

from ft_ray.config import load_config
from tests.conftest import REPO

K8S = REPO / "k8s"
K8S_VERSION = "1.31"


def crd_folder() -> Path | None:
    candidates = [os.environ.get("FT_RAY_KUBERAY_CRDS"), REPO.parent / "shared" / "kuberay" / "crds"]
    return next((Path(c) for c in candidates if c and Path(c).is_dir()), None)


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict]:
    folder = crd_folder()
    if folder is None:
        pytest.skip("KubeRay CRDs not found: set FT_RAY_KUBERAY_CRDS to a folder with ray.io_*.yaml")
    schemas = {}
    for path in folder.glob("ray.io_*.yaml"):
        crd = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        for version in crd["spec"]["versions"]:
            if version.get("served") and version.get("storage"):
                key = f"{crd['spec']['group']}/{version['name']}/{crd['spec']['names']['kind']}"
                schemas[key] = strict_schema(version["schema"]["openAPIV3Schema"])
    return schemas


def strict_schema(schema: dict) -> dict:
    """The CRD schema as JSON Schema: objects with declared properties reject unknown keys
    unless marked x-kubernetes-preserve-unknown-fields; int-or-string fields take either."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            if "properties" in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node.setdefault("additionalProperties", False)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    schema["properties"].setdefault("apiVersion", {"type": "string"})
    schema["properties"].setdefault("kind", {"type": "string"})
    return schema


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def validate_custom(resource: dict, schemas: dict) -> None:
    key = f"{resource['apiVersion']}/{resource['kind']}"
    jsonschema.validate(resource, schemas[key])


MANIFESTS = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_is_valid(path, crd_schemas):
    import kubernetes_validate

    for resource in documents(path):
        if resource["apiVersion"].startswith("ray.io/"):
            validate_custom(resource, crd_schemas)
            for pod in pod_templates(resource):
                kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                              "template": pod}, K8S_VERSION, strict=True)
        else:
            kubernetes_validate.validate(resource, K8S_VERSION, strict=True)
    assert path.read_text().startswith("#"), "a manifest starts with the command that applies it"


def test_a_wrong_field_fails(crd_schemas):
    [job] = documents(K8S / "rayjob-train.yaml")
    job["spec"]["shutdownAfterJobFinish"] = True  # misspelt
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        validate_custom(job, crd_schemas)
    [cluster] = documents(K8S / "raycluster.yaml")
    cluster["spec"]["workerGroupSpecs"][0]["replicas"] = "many"
    with pytest.raises(jsonschema.ValidationError):
        validate_custom(cluster, crd_schemas)


def pod_templates(resource: dict) -> list[dict]:
    spec = resource["spec"].get("rayClusterSpec", resource["spec"])
    templates = [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]
    if "submitterPodTemplate" in resource["spec"]:
        templates.append(resource["spec"]["submitterPodTemplate"])
    return templates


def images(resource: dict) -> set[str]:
    return {c["image"] for pod in pod_templates(resource) for c in pod["spec"]["containers"]}


def gpus_of(job: dict) -> int:
    """The GPUs a RayJob's cluster has at most."""
    return sum(int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) * g["maxReplicas"]
               for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"])


def dockerfile_tag() -> str:
    for line in (REPO / "cluster" / "Dockerfile").read_text().splitlines():
        if line.startswith("# image:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError("cluster/Dockerfile names its image in a '# image: NAME:TAG' line")


def test_cross_checks_configmap_image_gpus_and_secrets():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    mounted = {Path(f).name for gen in kustomization["configMapGenerator"] for f in gen["files"]}
    for f in (f for gen in kustomization["configMapGenerator"] for f in gen["files"]):
        assert (K8S / f).resolve().exists(), f"{f} listed in the ConfigMap does not exist"
    tag = dockerfile_tag()
    for path in MANIFESTS:
        for resource in documents(path):
            if resource["kind"] == "Secret":
                assert all(v == "" for v in resource.get("stringData", {}).values()), "a template holds no secret"
                continue
            if not resource["apiVersion"].startswith("ray.io/"):
                continue
            assert images(resource) == {tag}, f"{path.name}: images {images(resource)} != Dockerfile {tag}"
            assert resource["spec"].get("rayClusterSpec", resource["spec"])["authOptions"] == {"mode": "token"}
            if resource["kind"] != "RayJob":
                continue
            config_file = resource["spec"]["entrypoint"].split()[-1]
            assert config_file.startswith("/configs/") and Path(config_file).name in mounted
            recipe = load_config(REPO / "configs" / Path(config_file).name)
            gpus = gpus_of(resource)
            # A sweep runs max_concurrent_trials trials of num_workers workers at once.
            at_once = recipe.tune.max_concurrent_trials if "ft-ray tune" in resource["spec"]["entrypoint"] else 1
            assert gpus == recipe.distributed.max_workers * at_once, \
                f"{path.name}: {gpus} GPUs for {at_once} x {recipe.distributed.num_workers} workers"
            env = str(resource)
            assert "runtimeEnvYAML" not in resource["spec"] or "API_KEY" not in resource["spec"]["runtimeEnvYAML"]
            assert "WANDB_API_KEY" not in env and "AWS_SECRET" not in env


def test_rayjobs_for_training_and_for_sweeps_are_in_the_kustomization():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    jobs = [r for name in kustomization["resources"] for r in documents(K8S / name) if r["kind"] == "RayJob"]
    assert sorted(r["spec"]["entrypoint"].split()[1] for r in jobs) == ["train", "tune"]
    assert all(r["spec"]["backoffLimit"] >= 1 and r["spec"]["shutdownAfterJobFinishes"] for r in jobs)


def test_the_train_rayjob_runs_the_dpo_recipe_on_the_same_gpus():
    [job] = [r for r in documents(K8S / "rayjob-train.yaml") if r["kind"] == "RayJob"]
    assert "/configs/dpo-qlora-llama3-8b.yaml" in (K8S / "rayjob-train.yaml").read_text()  # the comment says how
    dpo = load_config(REPO / "configs" / "dpo-qlora-llama3-8b.yaml")
    assert dpo.objective == "dpo" and gpus_of(job) == dpo.distributed.max_workers
