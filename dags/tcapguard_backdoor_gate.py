"""tcapguard_backdoor_gate: the backdoor scan-and-gate job as an Airflow DAG. Wiring only: every step
task makes one call into tcapguard (in-process) or runs `tcapguard step NAME CONFIG` in the tcapguard
image (a pod), so the DAG holds no step logic and no thresholds.

    resolve_config -> choose_mode -> local.*  (one @task per step, profile mapped over workers,
                                               finetune over the config's fine-tune seeds)
                                  \\-> kubernetes.* (one pod per step, mapped the same way)
                   -> verdict -> promote (gate passed) | reject (gate failed: fails the run)

Trigger with conf, e.g. ``{"config": "s3://bucket/pipeline.yaml", "model": "...", "policy": {...}}``.
``mode`` (conf) or the Variable ``tcapguard_mode`` picks ``local`` (default) or ``kubernetes``.
Steps are idempotent (content-keyed outputs under the config's work_dir), so tasks retry safely.
The top level imports only Airflow and the Kubernetes provider; tcapguard is imported in task bodies.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pendulum
from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
from airflow.sdk import Param, TaskGroup, Variable, dag, get_current_context, task
from airflow.sdk.exceptions import AirflowFailException
from kubernetes.client import models as k8s

DAG_ID = "tcapguard_backdoor_gate"
# The library's steps (tcapguard.pipeline.STEP_FUNCTIONS) in order; tests check the two agree.
STEPS = (
    "probe-finetune",
    "profile",
    "merge-profile",
    "filter",
    "finetune",
    "select",
    "evaluate-probe",
    "evaluate",
    "gate",
)
GPU_STEPS = {"probe-finetune", "profile", "finetune", "select", "evaluate-probe", "evaluate"}

# Kubernetes mode: names an operator sets up once (Variables with these defaults, Secrets, a PVC).
IMAGE = "ghcr.io/tcapguard/tcapguard:0.1.0"  # moves with the package version (tests check)
# The Variable names the CPU image; GPU steps take its "-cuda" build.
IMAGE_TEMPLATE = "{{ var.value.get('tcapguard_image', '" + IMAGE + "') }}"
CUDA_IMAGE_TEMPLATE = "{{ var.value.get('tcapguard_image', '" + IMAGE + "') ~ '-cuda' }}"
NAMESPACE_TEMPLATE = "{{ var.value.get('tcapguard_namespace', 'default') }}"
S3_SECRET = "tcapguard-s3"  # AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
MLFLOW_SECRET = "tcapguard-mlflow"  # MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
WORK_PVC = "tcapguard-work"  # ReadWriteMany, mounted where the config's work_dir lives
WORK_MOUNT = "/workspace"
CONFIG_IN_POD = "/tmp/tcapguard-config.yaml"
XCOM_FILE = "/airflow/xcom/return.json"  # the pod's outputs travel back through the XCom sidecar


@task
def resolve_config() -> str:
    """The run's config (conf overrides applied), checked before anything runs, as one YAML document."""
    from tcapguard.orchestration import load_config, to_yaml

    params = get_current_context()["params"]
    config = load_config(
        params["config"],
        model=params["model"],
        train=params["train"],
        test=params["test"],
        policy=params["policy"],
        work_dir=params["work_dir"],
    )
    return to_yaml(config)


@task
def shards() -> list[dict[str, int]]:
    """One entry per profiling worker (the mapped profile tasks' arguments)."""
    workers = int(get_current_context()["params"]["num_workers"])
    return [{"worker": i, "workers": workers} for i in range(workers)]


@task
def candidates(config: str) -> list[dict[str, int]]:
    """One entry per fine-tune (the mapped finetune tasks' arguments): a seed each."""
    from tcapguard.orchestration import finetune_seeds

    return [{"seed": seed} for seed in finetune_seeds(config)]


@task.branch
def choose_mode() -> str:
    """``local`` or ``kubernetes``: the run's conf, else the Variable ``tcapguard_mode``, else local."""
    mode = get_current_context()["params"]["mode"] or Variable.get("tcapguard_mode", default="local")
    if mode not in ("local", "kubernetes"):
        raise AirflowFailException(f"mode must be 'local' or 'kubernetes', got {mode!r}")
    return f"{mode}.{STEPS[0]}"


@task(retries=2, retry_delay=timedelta(minutes=1))
def run_step(
    config: str, name: str, worker: int = 0, workers: int = 1, seed: int | None = None
) -> dict[str, Any]:
    """One step in this worker process (its outputs are URIs and small figures: XCom-sized)."""
    from tcapguard.orchestration import run_step as run

    return run(config, name, worker=worker, workers=workers, seed=seed)


def _pod_script(name: str, extra: str = "") -> str:
    """The pod's command: write the config, run the step, leave its outputs for the XCom sidecar.
    For the gate, exit 1 (a failed verdict) is an outcome the verdict task reads, not a pod failure."""
    run = f"tcapguard step {name} {CONFIG_IN_POD}{extra} --outputs-json {XCOM_FILE}"
    if name == "gate":
        run = f"{run} || [ $? -eq 1 ]"
    return f'printf "%s" "$TCAPGUARD_CONFIG" > {CONFIG_IN_POD} && mkdir -p /airflow/xcom && {run}'


def _pod_settings(name: str) -> dict[str, Any]:
    gpu = name in GPU_STEPS
    return {
        "name": f"tcapguard-{name}",
        "image": CUDA_IMAGE_TEMPLATE if gpu else IMAGE_TEMPLATE,
        "namespace": NAMESPACE_TEMPLATE,
        "cmds": ["/bin/sh", "-c"],
        "env_vars": {"TCAPGUARD_CONFIG": "{{ ti.xcom_pull(task_ids='resolve_config') }}"},
        "env_from": [
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=secret, optional=True))
            for secret in (S3_SECRET, MLFLOW_SECRET)
        ],
        "volumes": [
            k8s.V1Volume(
                name="work",
                persistent_volume_claim=k8s.V1PersistentVolumeClaimVolumeSource(claim_name=WORK_PVC),
            )
        ],
        "volume_mounts": [k8s.V1VolumeMount(name="work", mount_path=WORK_MOUNT)],
        "container_resources": k8s.V1ResourceRequirements(limits={"nvidia.com/gpu": "1"}) if gpu else None,
        "node_selector": {"nvidia.com/gpu.present": "true"} if gpu else None,
        "do_xcom_push": True,
        "get_logs": True,
        "on_finish_action": "delete_pod",
        "retries": 2,
        "retry_delay": timedelta(minutes=1),
    }


@task
def pod_arguments(name: str, mapped: list[dict[str, int]]) -> list[list[str]]:
    """The mapped pods' arguments of step ``name``, one per entry (``{"worker": 0, "workers": 2}`` is
    ``--worker 0 --workers 2``)."""
    return [[_pod_script(name, "".join(f" --{k} {v}" for k, v in kwargs.items()))] for kwargs in mapped]


@task.branch(trigger_rule="none_failed_min_one_success")
def verdict() -> str:
    """``promote`` when the gate (whichever mode ran it) passed, else ``reject``."""
    outputs = _gate_outputs()
    return "promote" if outputs.get("passed") is True else "reject"


def _gate_outputs() -> dict[str, Any]:
    pulled = get_current_context()["ti"].xcom_pull(task_ids=["local.gate", "kubernetes.gate"])
    found = [o for o in pulled or [] if o]
    if not found:
        raise AirflowFailException("no gate outputs found: the gate did not run")
    return found[0]


@task
def promote(config: str) -> str:
    """Confirm in the registry that the passed version holds the alias, and announce it."""
    from tcapguard.orchestration import load_config, promotion_notice

    notice = promotion_notice(_gate_outputs(), tracking_uri=load_config(config).tracking.tracking_uri)
    print(notice["message"])
    return notice["message"]


@task(retries=0)
def reject() -> None:
    """Fail the run when the gate failed (fail closed): the version stays registered, no alias moved."""
    outputs = _gate_outputs()
    reasons = "; ".join(outputs.get("reasons", [])) or "no reason recorded"
    raise AirflowFailException(
        f"{outputs.get('model_name')} version {outputs.get('version')} failed the backdoor gate: {reasons}"
    )


@dag(
    dag_id=DAG_ID,
    schedule=None,
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=4,
    tags=["tcapguard", "mlops", "backdoor"],
    doc_md=__doc__,
    params={
        "config": Param(
            "", type="string", description="pipeline config: a YAML document or a path/s3:// URI"
        ),
        "model": Param(
            "", type="string", description="override model.source (directory, s3://, models:/, hub id)"
        ),
        "train": Param("", type="string", description="override data.train (the upload)"),
        "test": Param("", type="string", description="override data.test (the clean test split)"),
        "policy": Param({}, type=["object", "string"], description="gate fields, or a policy file path/URI"),
        "work_dir": Param("", type="string", description="override work_dir"),
        "num_workers": Param(2, type="integer", minimum=1, description="parallel profiling workers"),
        "mode": Param("", enum=["", "local", "kubernetes"], description="empty: Variable tcapguard_mode"),
    },
)
def tcapguard_backdoor_gate():
    config = resolve_config()
    fanout = {"profile": shards(), "finetune": candidates(config)}
    mode = choose_mode()
    config >> mode

    with TaskGroup("local") as local:
        previous = None
        for name in STEPS:
            if name in fanout:
                current = (
                    run_step.override(task_id=name)
                    .partial(config=config, name=name)
                    .expand_kwargs(fanout[name])
                )
            else:
                current = run_step.override(task_id=name)(config=config, name=name)
            if previous is not None:
                previous >> current
            previous = current
    with TaskGroup("kubernetes") as kubernetes:
        previous = None
        for name in STEPS:
            if name in fanout:
                arguments = pod_arguments.override(task_id=f"{name}_arguments")(name, fanout[name])
                mode >> arguments  # skipped with the rest of the group in local mode
                current = KubernetesPodOperator.partial(task_id=name, **_pod_settings(name)).expand(
                    arguments=arguments
                )
            else:
                current = KubernetesPodOperator(
                    task_id=name, arguments=[_pod_script(name)], **_pod_settings(name)
                )
            if previous is not None:
                previous >> current
            previous = current
    mode >> [local, kubernetes]
    decided = verdict()
    [local, kubernetes] >> decided
    decided >> [promote(config), reject()]


dag_object = tcapguard_backdoor_gate()
