"""The component images: the versioned tcapguard image (docker/), its CUDA build for GPU steps.

Components run on it as it is (``install_kfp_package=False``): nothing is pip-installed at run time,
so the image must carry the KFP executor (the ``tcapguard[kfp]`` extra).
"""

from tcapguard import __version__

REPOSITORY = "ghcr.io/tcapguard/tcapguard"
IMAGE = f"{REPOSITORY}:{__version__}"
IMAGE_CUDA = f"{REPOSITORY}:{__version__}-cuda"
