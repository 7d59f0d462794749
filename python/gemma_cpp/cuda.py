"""Whether the CUDA backend can run here, and if not, why.

``cuda_available()`` answers with a bool, as ``torch.cuda.is_available()`` does, so that
``if gemma_cpp.cuda_available():`` reads naturally; ``cuda_status()`` says why:

>>> gemma_cpp.cuda_available()
False
>>> gemma_cpp.cuda_status()["reason"]
'no CUDA driver (cudaErrorInsufficientDriver: libcuda was not found)'

The reasons, in the order they are checked: the extension was built without CUDA (no nvcc
at build time, or ``GEMMA_CPP_CUDA=OFF``); no CUDA driver, or one older than the runtime the
extension was built with; no CUDA device (``CUDA_VISIBLE_DEVICES``); a GPU older than sm_80
(Ampere); a GPU this build holds no kernels for (rebuild with ``CUDAARCHS=<its sm>``). The
answer is computed once per process. The extension imports and runs on the CPU in every
one of these cases.

Status of the backend: the kernels (csrc/cuda/) and whole models on the GPU
(``from_pretrained(..., device="cuda")``, csrc/engine/device_cuda.cpp) are built and tested
against the CPU engine where a GPU is present (benchmarks/gpu_check.sh); none has yet run on
one in this project's CI, which has no GPU.
"""
from __future__ import annotations

from typing import Any, Dict

from ._C import cuda_status as _cuda_status


def cuda_status() -> Dict[str, Any]:
    """The CUDA build and device status, as a dict:

    - ``available`` (bool): the kernels can run on device 0;
    - ``built`` (bool): the extension holds the CUDA kernels;
    - ``reason`` (str): why not, or a one-line description of device 0 when available;
    - ``device_count`` (int), ``device`` (name of device 0 or None),
      ``compute_capability`` ((major, minor) or None),
      ``runtime_version`` / ``driver_version`` (e.g. 13000 for CUDA 13.0; None when not
      built, 0 when there is no driver).
    """
    return dict(_cuda_status())


def cuda_available() -> bool:
    """True when the CUDA kernels can run on this machine (see ``cuda_status()["reason"]``
    for why not)."""
    return bool(_cuda_status()["available"])
