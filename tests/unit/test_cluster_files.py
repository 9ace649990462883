"""The files under cluster/: valid YAML with the fields Ray and KubeRay need, no secrets."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"
YAML_FILES = sorted(CLUSTER.glob("*.yaml"))

SECRET_PATTERNS = [
    re.compile(r"AKIA[0-9A-Z]{16}"),  # AWS access key id
    re.compile(r"(?i)aws_secret_access_key\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{30,}"),
    re.compile(r"(?i)wandb_api_key\s*[:=]\s*['\"]?[0-9a-f]{30,}"),
    re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
]
SECRET_ENV = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "WANDB_API_KEY"}


def load(name: str) -> dict[str, Any]:
    """Parse one YAML file of cluster/."""
    data = yaml.safe_load((CLUSTER / name).read_text())
    assert isinstance(data, dict)
    return data


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    """The containers of a pod template."""
    return list(pod_template["template"]["spec"]["containers"])


def ray_pods(spec: dict[str, Any]) -> list[dict[str, Any]]:
    """Head and worker group pod templates of a RayCluster spec."""
    return [spec["headGroupSpec"], *spec["workerGroupSpecs"]]


class TestAllFiles:
    def test_the_expected_files_exist(self) -> None:
        """cluster/ has the launcher config, both KubeRay manifests, the script and a README."""
        names = {p.name for p in CLUSTER.iterdir()}
        assert {
            "aws-cluster.yaml",
            "kuberay-raycluster.yaml",
            "kuberay-rayjob.yaml",
            "local-cluster.sh",
            "Dockerfile",
            "README.md",
        } <= names

    @pytest.mark.parametrize("path", YAML_FILES, ids=[p.name for p in YAML_FILES])
    def test_yaml_parses(self, path: Path) -> None:
        """Every YAML file is one mapping."""
        assert isinstance(yaml.safe_load(path.read_text()), dict)

    @pytest.mark.parametrize("path", YAML_FILES, ids=[p.name for p in YAML_FILES])
    def test_no_literal_secrets(self, path: Path) -> None:
        """No access key, secret or API key is written in a YAML file."""
        text = path.read_text()
        for pattern in SECRET_PATTERNS:
            assert not pattern.search(text), pattern.pattern

    def test_local_script_is_executable_and_parses(self) -> None:
        """local-cluster.sh is executable (CI runs it only then) and valid bash."""
        script = CLUSTER / "local-cluster.sh"
        assert os.access(script, os.X_OK)
        bash = shutil.which("bash")
        assert bash is not None
        subprocess.run([bash, "-n", str(script)], check=True)

    def test_local_script_stops_by_pid_never_globally(self) -> None:
        """The script never runs `ray stop` and uses a private temp dir."""
        text = (CLUSTER / "local-cluster.sh").read_text()
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert "ray stop" not in code
        assert "--temp-dir" in code
        assert "trap cleanup EXIT" in code
        assert "RAY_AUTH_MODE=disabled" in code


class TestLauncherConfig:
    def test_aws_fields(self) -> None:
        """The launcher config names AWS, a head type, workers and installs the package."""
        cfg = load("aws-cluster.yaml")
        assert cfg["provider"]["type"] == "aws"
        assert cfg["head_node_type"] in cfg["available_node_types"]
        assert cfg["max_workers"] >= 1
        mounted = [remote for remote, local in cfg["file_mounts"].items() if local == "./dist"]
        assert mounted, cfg["file_mounts"]  # the wheel built from the clone goes to every node
        assert any(
            f"{mounted[0]}/art_ray_metrics-" in c and ".whl" in c and "[demo]" in c
            for c in cfg["setup_commands"]
        )
        assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
        assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])

    def test_s3_access_by_instance_profile(self) -> None:
        """Nodes get S3 access from an IAM instance profile, not keys."""
        cfg = load("aws-cluster.yaml")
        for node in cfg["available_node_types"].values():
            assert "IamInstanceProfile" in node["node_config"]


class TestKubeRay:
    def test_raycluster(self) -> None:
        """The RayCluster has a head group and a worker group."""
        doc = load("kuberay-raycluster.yaml")
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["kind"] == "RayCluster"
        assert doc["spec"]["workerGroupSpecs"][0]["replicas"] >= 1

    def test_rayjob_runs_the_demo_against_its_cluster_with_s3(self) -> None:
        """The RayJob's entrypoint runs the demo, joins the cluster and stores the run in S3."""
        doc = load("kuberay-rayjob.yaml")
        assert doc["apiVersion"] == "ray.io/v1"
        assert doc["kind"] == "RayJob"
        entry = doc["spec"]["entrypoint"]
        assert entry.startswith("art-ray-metrics demo")
        assert "--address auto" in entry
        assert re.search(r"--storage s3://\S+", entry)
        assert doc["spec"]["shutdownAfterJobFinishes"] is True

    @pytest.mark.parametrize(
        ("name", "spec_path"),
        [
            ("kuberay-raycluster.yaml", ("spec",)),
            ("kuberay-rayjob.yaml", ("spec", "rayClusterSpec")),
        ],
        ids=["raycluster", "rayjob"],
    )
    def test_pods_run_the_image_built_from_the_clone(
        self, name: str, spec_path: tuple[str, ...]
    ) -> None:
        """Every Ray container runs the image cluster/Dockerfile builds from the wheel (the
        package is on no index, so a stock Ray image or a runtime-env `pip:` cannot get it)."""
        spec: Any = load(name)
        for key in spec_path:
            spec = spec[key]
        images = {c["image"] for group in ray_pods(spec) for c in containers(group)}
        assert images == {"YOUR-REGISTRY/art-ray-metrics:0.1.0"}
        dockerfile = (CLUSTER / "Dockerfile").read_text()
        assert "FROM rayproject/ray:2.60.0-py311" in dockerfile
        assert re.search(r"pip install .*art_ray_metrics-\*\.whl.*\[demo\]", dockerfile)
        assert "runtimeEnvYAML" not in load(name).get("spec", {})

    @pytest.mark.parametrize(
        ("name", "spec_path"),
        [
            ("kuberay-raycluster.yaml", ("spec",)),
            ("kuberay-rayjob.yaml", ("spec", "rayClusterSpec")),
        ],
        ids=["raycluster", "rayjob"],
    )
    def test_credentials_come_from_a_secret(self, name: str, spec_path: tuple[str, ...]) -> None:
        """Every credential env var of every Ray container is a secretKeyRef, never a value."""
        spec: Any = load(name)
        for key in spec_path:
            spec = spec[key]
        seen = set()
        for group in ray_pods(spec):
            for container in containers(group):
                for env in container.get("env", []):
                    if env["name"] in SECRET_ENV:
                        assert "value" not in env, env["name"]
                        assert "secretKeyRef" in env["valueFrom"], env["name"]
                        seen.add(env["name"])
        assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WANDB_API_KEY"} <= seen
