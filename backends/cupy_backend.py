"""CuPy backend: arrays and kernels on an NVIDIA GPU."""

from backends.base import Backend, BackendNotInstalledError, NoCudaDeviceError


def create_backend() -> Backend:
    try:
        import cupy
    except ImportError as err:  # absent, or installed without its CUDA libraries
        raise BackendNotInstalledError(
            f"backend 'cupy' needs cupy ({err}): pip install 'gradgap[cuda12]' (CUDA 12) or 'gradgap[cuda13]' (CUDA 13)"
        ) from err
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as err:  # CUDARuntimeError, or a driver that cannot be loaded
        raise NoCudaDeviceError(f"cupy is installed but no usable CUDA device was found: {err}") from err
    if count < 1:
        raise NoCudaDeviceError("cupy is installed but the CUDA runtime reports 0 devices")
    from kernels import cupy_kernels

    return Backend(name="cupy", xp=cupy, kernels=cupy_kernels, _sync=lambda: cupy.cuda.Device().synchronize())
