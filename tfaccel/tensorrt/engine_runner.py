"""Run a serialized TensorRT engine: named numpy arrays in, named numpy arrays out.

Uses the name-based API of TensorRT 10/11 (``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) and cuda-python's runtime bindings for device memory and the stream, so the
pipeline validates and measures an engine like every other artifact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from tfaccel.core.artifact import register_kind
from tfaccel.errors import InputMismatchError, StepError
from tfaccel.tensorrt.availability import cuda_check, import_cudart, import_tensorrt, require_gpu


class TrtEngineRunner:
    """Runs a TensorRT engine on the GPU.

    Device buffers are kept between calls and grow when a larger shape comes; the optimization
    profile is chosen per call (the first whose min..max covers every input's shape).

    Args:
        engine_path: a serialized engine (``model.engine`` from :func:`tfaccel.tensorrt.build_engine`).

    Raises:
        MissingDependencyError: ``tensorrt`` or ``cuda-python`` is missing (``pip install 'tfaccel[trt]'``).
        StepError: no GPU, or the engine was built by another TensorRT version / for another GPU.

    Example:
        >>> runner = TrtEngineRunner("out/stages/03-tensorrt/model.engine")  # doctest: +SKIP
        >>> runner({"token_ids": ids, "segment_ids": seg, "padding_mask": mask})["logits"].shape  # doctest: +SKIP
        (8, 3)
    """

    def __init__(self, engine_path: str | os.PathLike):
        trt = import_tensorrt(purpose="running TensorRT engines")
        self._cudart = import_cudart()
        require_gpu("Running a TensorRT engine")
        self.path = str(engine_path)
        self._trt = trt
        self._logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(self._logger)
        self.engine = self._runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise StepError(
                f"TensorRT {trt.__version__} could not load the engine {engine_path}. An engine loads only with the "
                "TensorRT version and GPU model that built it: rebuild it on this machine."
            )
        self.context = self.engine.create_execution_context()
        self.input_dtypes: dict[str, Any] = {}
        self.output_dtypes: dict[str, Any] = {}
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self.engine.get_tensor_dtype(name)))
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_dtypes[name] = dtype
            else:
                self.output_dtypes[name] = dtype
        self.profiles = [
            {name: tuple(tuple(int(d) for d in s) for s in self.engine.get_tensor_profile_shape(name, k))
             for name in self.input_dtypes}
            for k in range(self.engine.num_optimization_profiles)
        ]
        self._active_profile = 0
        self._stream = cuda_check(self._cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)

    # ------------------------------------------------------------------------------------------
    def _device(self, name: str, nbytes: int) -> int:
        ptr, size = self._buffers.get(name, (0, 0))
        if size < nbytes:
            if ptr:
                cuda_check(self._cudart.cudaFree(ptr), "cudaFree")
            ptr = int(cuda_check(self._cudart.cudaMalloc(max(nbytes, 1)), f"cudaMalloc({nbytes}) for '{name}'"))
            self._buffers[name] = (ptr, nbytes)
        return ptr

    def _select_profile(self, shapes: dict[str, tuple[int, ...]]) -> int:
        for k, prof in enumerate(self.profiles):
            if all(all(lo <= d <= hi for d, lo, hi in zip(shapes[n], prof[n][0], prof[n][2], strict=False))
                   and len(shapes[n]) == len(prof[n][0]) for n in shapes):
                return k
        ranges = "; ".join(", ".join(f"{n} {p[n][0]}..{p[n][2]}" for n in p) for p in self.profiles)
        raise InputMismatchError(
            f"Input shapes {shapes} are outside every optimization profile of {self.path} ({ranges}). Rebuild the "
            "engine with larger limits, e.g. --set tensorrt.max_batch=64 --set tensorrt.max_seq=256."
        )

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = sorted(set(self.input_dtypes) - set(inputs))
        extra = sorted(set(inputs) - set(self.input_dtypes))
        if missing or extra:
            raise InputMismatchError(
                f"The engine {self.path} takes inputs {sorted(self.input_dtypes)}; missing {missing}, unexpected {extra}."
            )
        cudart, stream = self._cudart, self._stream
        arrays = {n: np.ascontiguousarray(np.asarray(inputs[n]).astype(dt, copy=False))
                  for n, dt in self.input_dtypes.items()}
        k = self._select_profile({n: a.shape for n, a in arrays.items()})
        if k != self._active_profile:
            self.context.set_optimization_profile_async(k, int(stream))
            self._active_profile = k
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for name, arr in arrays.items():
            if not self.context.set_input_shape(name, arr.shape):
                raise InputMismatchError(f"TensorRT rejected shape {arr.shape} for input '{name}' of {self.path}.")
            ptr = self._device(name, arr.nbytes)
            cuda_check(cudart.cudaMemcpyAsync(ptr, arr.ctypes.data, arr.nbytes, h2d, stream), "cudaMemcpyAsync(H2D)")
            self.context.set_tensor_address(name, ptr)
        outputs = {}
        for name, dt in self.output_dtypes.items():
            shape = tuple(int(d) for d in self.context.get_tensor_shape(name))
            if any(d < 0 for d in shape):
                raise StepError(f"Output '{name}' of {self.path} has a data-dependent shape {shape}; "
                                "tfaccel's runner supports shapes known from the inputs only.")
            host = np.empty(shape, dtype=dt)
            self.context.set_tensor_address(name, self._device(name, host.nbytes))
            outputs[name] = host
        if not self.context.execute_async_v3(int(stream)):
            raise StepError(f"TensorRT failed to run {self.path} (execute_async_v3 returned False).")
        for name, host in outputs.items():
            ptr, _ = self._buffers[name]
            cuda_check(cudart.cudaMemcpyAsync(host.ctypes.data, ptr, host.nbytes, d2h, stream), "cudaMemcpyAsync(D2H)")
        cuda_check(cudart.cudaStreamSynchronize(stream), "cudaStreamSynchronize")
        return outputs

    def close(self) -> None:
        """Free the device buffers and the stream (also done when the runner is garbage collected)."""
        cudart = getattr(self, "_cudart", None)
        if cudart is None:
            return
        for ptr, _ in getattr(self, "_buffers", {}).values():
            cudart.cudaFree(ptr)
        self._buffers = {}
        if getattr(self, "_stream", None) is not None:
            cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


register_kind("tensorrt", "TensorRT engine", lambda a: TrtEngineRunner(a.path))
