from typing import List  # noqa: UP035 (the form KFP documents for list outputs)

from kfp import dsl

from components.images import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def worker_indices(num_workers: int) -> List[int]:  # noqa: UP006 (see the import)
    """The profiling workers' indices, 0 .. num_workers - 1, for the pipeline's ParallelFor.

    Args:
        num_workers: how many workers share the profile's shards (at least 1).

    Returns:
        The indices.
    """
    if num_workers < 1:
        raise ValueError(f"num_workers must be at least 1, got {num_workers}")
    return list(range(num_workers))


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finetune_seeds(config: str) -> List[int]:  # noqa: UP006 (see the import)
    """The seeds of the config's fine-tunes, for the pipeline's ParallelFor: one per
    ``selection.seeds``, else the config's own ``finetune.seed``.

    Args:
        config: the pipeline config, a YAML document or a path/s3:// URI of one.

    Returns:
        The seeds.
    """
    from tcapguard.orchestration import finetune_seeds as seeds

    return seeds(config)
