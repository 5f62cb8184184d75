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
