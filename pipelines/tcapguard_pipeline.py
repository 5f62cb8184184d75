"""The backdoor scan-and-gate job as a Kubeflow pipeline: wiring only, every task is one component.

probe fine-tune -> attention profiling (ParallelFor over worker indices) -> merge -> TCAP filter ->
fine-tune (ParallelFor over the config's fine-tune seeds) -> select (one of them; a pass-through
without selection.seeds) -> evaluate probe / final -> gate -> If passed: promote, Else: reject
(fails the run).

Compile with ``python -m pipelines.tcapguard_pipeline`` (writes ``pipelines/tcapguard_pipeline.yaml``);
tests/test_kfp.py fails when the committed YAML is stale.
"""

import sys
from pathlib import Path

from components import (
    evaluate,
    finetune,
    finetune_seeds,
    gate,
    merge_profile,
    probe_finetune,
    profile_attention,
    promote,
    reject,
    select_model,
    tcap_filter,
    worker_indices,
)
from kfp import compiler, dsl, kubernetes

PIPELINE_NAME = "tcapguard-backdoor-gate"
COMPILED = Path(__file__).with_suffix(".yaml")

# Kubernetes settings the tasks get (kfp-kubernetes). Secrets are optional, so a cluster that needs
# none (in-cluster MLflow without auth, IAM roles for S3) runs the same package.
S3_SECRET = "tcapguard-s3"  # keys AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
MLFLOW_SECRET = "tcapguard-mlflow"  # keys MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD
WORK_PVC = "tcapguard-work"  # a ReadWriteMany volume at work_dir's mount (models are written locally)
WORK_MOUNT = "/workspace"
GPU_NODE_LABEL = ("nvidia.com/gpu.present", "true")
GPU_TYPE = "nvidia.com/gpu"

# Each step task's display name is its step in tcapguard.pipeline.STEP_FUNCTIONS (tests compare them);
# worker-indices and finetune-seeds (the fan-outs), promote and reject are the pipeline's own.
FANOUT_AND_VERDICT_TASKS = ("worker-indices", "finetune-seeds", "promote", "reject")


def _on_cluster(task: dsl.PipelineTask, *, gpu: bool = False) -> dsl.PipelineTask:
    """Credentials from Secrets, the shared work volume, and for GPU steps one GPU on a GPU node."""
    kubernetes.use_secret_as_env(
        task,
        secret_name=S3_SECRET,
        secret_key_to_env={
            "AWS_ACCESS_KEY_ID": "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY": "AWS_SECRET_ACCESS_KEY",
        },
        optional=True,
    )
    kubernetes.use_secret_as_env(
        task,
        secret_name=MLFLOW_SECRET,
        secret_key_to_env={
            "MLFLOW_TRACKING_USERNAME": "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD": "MLFLOW_TRACKING_PASSWORD",
        },
        optional=True,
    )
    kubernetes.mount_pvc(task, pvc_name=WORK_PVC, mount_path=WORK_MOUNT)
    task.set_caching_options(False)  # the steps keep their own content-keyed cache under work_dir
    if gpu:
        task.set_accelerator_type(GPU_TYPE).set_accelerator_limit(1)
        kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    return task


@dsl.pipeline(name=PIPELINE_NAME, description="Backdoor scan of a fine-tuning upload and a fail-closed gate")
def tcapguard_backdoor_gate(config: str, num_workers: int = 2):
    """Args:
    config: the pipeline config (the YAML `tcapguard run` reads), as a document or a path/s3:// URI.
    num_workers: parallel profiling workers (each takes every num_workers-th shard of the upload).
    """
    probe = _on_cluster(probe_finetune(config=config), gpu=True).set_display_name("probe-finetune")
    indices = worker_indices(num_workers=num_workers).set_caching_options(False)
    indices.set_display_name("worker-indices")
    with dsl.ParallelFor(items=indices.output) as worker:
        shard = profile_attention(
            config=config, probe_model=probe.outputs["probe_model"], worker=worker, workers=num_workers
        )
        _on_cluster(shard, gpu=True).set_display_name("profile")
    merged = _on_cluster(merge_profile(config=config).after(shard)).set_display_name("merge-profile")
    filtered = _on_cluster(tcap_filter(config=config, profile=merged.outputs["profile"]))
    filtered.set_display_name("filter")
    seeds = _on_cluster(finetune_seeds(config=config)).set_display_name("finetune-seeds")
    with dsl.ParallelFor(items=seeds.output) as seed:
        tuned = finetune(config=config, clean_train=filtered.outputs["clean_train"], seed=seed)
        _on_cluster(tuned, gpu=True).set_display_name("finetune")
    final = select_model(config=config, candidates=dsl.Collected(tuned.outputs["model"]))
    _on_cluster(final, gpu=True).set_display_name("select")
    before = evaluate(config=config, model=probe.outputs["probe_model"], which="probe").after(filtered)
    _on_cluster(before, gpu=True).set_display_name("evaluate-probe")
    after = _on_cluster(evaluate(config=config, model=final.outputs["model"], which="final"), gpu=True)
    after.after(before).set_display_name("evaluate")
    verdict = _on_cluster(gate(config=config).after(after)).set_display_name("gate")
    with dsl.If(verdict.outputs["passed"] == True):  # noqa: E712 (a KFP condition, not a Python test)
        _on_cluster(promote(config=config, gate_outputs=verdict.outputs["outputs"])).set_display_name(
            "promote"
        )
    with dsl.Else():
        _on_cluster(reject(gate_outputs=verdict.outputs["outputs"])).set_display_name("reject")


def compile_pipeline(path: str | Path = COMPILED) -> Path:
    """Write the pipeline package (IR YAML) to ``path``."""
    compiler.Compiler().compile(tcapguard_backdoor_gate, str(path))
    return Path(path)


if __name__ == "__main__":
    print(compile_pipeline(sys.argv[1] if len(sys.argv) > 1 else COMPILED))
