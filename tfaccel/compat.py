"""The one place that probes versions, optional packages and the hardware.

Nothing here changes environment variables or imports tensorflow_model_optimization (importing it
switches ``tf.keras`` to tf_keras for the whole process). Versions of optional packages are read from
their installed metadata, not by importing them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import importlib.metadata
import importlib.util
import os
import platform
from collections.abc import Iterator
from typing import Any

# CPU flags that matter for fast int8/bf16/fp16 math, as Linux names them in /proc/cpuinfo.
_CPU_FLAGS = {
    "avx2": ("avx2",),
    "fma": ("fma",),
    "avx512": ("avx512f",),
    "vnni": ("avx512_vnni", "avx_vnni"),
    "bf16": ("avx512_bf16", "amx_bf16"),
    "fp16": ("avx512_fp16", "amx_fp16"),
    "amx": ("amx_tile",),
}


# ISA levels tfaccel's hardware decisions can be capped to, lowest first: what each level keeps of the
# features above. ``TFACCEL_CPU_ISA=avx2`` makes an AVX-512 machine decide (int8 kernels, onnxruntime
# quantization settings, half precision) as an AVX2-only CPU (AMD Zen 3) would; CI uses it, together with
# oneDNN's own ``ONEDNN_MAX_CPU_ISA`` and XLA's ``--xla_cpu_max_isa``, to run the AVX2 branches here.
ISA_LEVELS: dict[str, frozenset[str]] = {
    "avx2": frozenset({"avx2", "fma"}),
    "avx2_vnni": frozenset({"avx2", "fma", "vnni"}),
    "avx512": frozenset({"avx2", "fma", "avx512"}),
    "avx512_vnni": frozenset({"avx2", "fma", "avx512", "vnni"}),
    "avx512_bf16": frozenset({"avx2", "fma", "avx512", "vnni", "bf16"}),
    "all": frozenset(_CPU_FLAGS),
}
# oneDNN's names (ONEDNN_MAX_CPU_ISA / DNNL_MAX_CPU_ISA) -> the level above that oneDNN then runs at.
_ONEDNN_ISA = {
    "SSE41": "avx2", "AVX": "avx2", "AVX2": "avx2", "AVX2_VNNI": "avx2_vnni", "AVX2_VNNI_2": "avx2_vnni",
    "AVX512_CORE": "avx512", "AVX512_CORE_VNNI": "avx512_vnni", "AVX512_CORE_BF16": "avx512_bf16",
    "AVX10_1_512": "all", "AVX512_CORE_FP16": "all", "AVX10_1_512_AMX": "all", "AVX512_CORE_AMX": "all",
    "AVX10_1_512_AMX_FP16": "all", "AVX512_CORE_AMX_FP16": "all", "ALL": "all", "DEFAULT": "all",
}


def cpu_isa_cap(environ: dict[str, str] | None = None) -> tuple[str | None, str]:
    """The ISA level hardware decisions are capped to, and where the cap comes from.

    ``TFACCEL_CPU_ISA`` (one of :data:`ISA_LEVELS`) wins; otherwise ``ONEDNN_MAX_CPU_ISA`` /
    ``DNNL_MAX_CPU_ISA``, because oneDNN then really runs at that level. Returns (None, "") when nothing
    caps the hardware.

    Example:
        >>> cpu_isa_cap({"TFACCEL_CPU_ISA": "avx2"})
        ('avx2', 'TFACCEL_CPU_ISA=avx2')
    """
    env = os.environ if environ is None else environ
    raw = env.get("TFACCEL_CPU_ISA", "").strip().lower()
    if raw:
        if raw not in ISA_LEVELS:
            raise ValueError(f"TFACCEL_CPU_ISA must be one of {', '.join(ISA_LEVELS)}. Received: {raw!r}")
        return raw, f"TFACCEL_CPU_ISA={raw}"
    for var in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA"):
        raw = env.get(var, "").strip().upper()
        if raw:
            return _ONEDNN_ISA.get(raw, "all"), f"{var}={raw}"
    return None, ""


def cap_cpu_features(features: dict[str, bool], level: str | None) -> dict[str, bool]:
    """``features`` with everything above ISA ``level`` switched off (None: unchanged)."""
    if level is None:
        return dict(features)
    keep = ISA_LEVELS[level]
    return {name: bool(have and name in keep) for name, have in features.items()}


def package_version(dist_name: str) -> str | None:
    """Installed version of a distribution, or None, without importing it."""
    try:
        return importlib.metadata.version(dist_name)
    except importlib.metadata.PackageNotFoundError:
        return None


def parse_cpu_flags(cpuinfo_text: str) -> dict[str, bool]:
    """Map the first ``flags`` line of /proc/cpuinfo text to tfaccel's feature names."""
    flags: set[str] = set()
    for line in cpuinfo_text.splitlines():
        if line.startswith("flags") and ":" in line:
            flags = set(line.split(":", 1)[1].split())
            break
    return {name: any(f in flags for f in linux_names) for name, linux_names in _CPU_FLAGS.items()}


# tfaccel's feature names -> the names of numpy's CPUID-based dispatch table (numpy cannot see AMX or AVX-VNNI).
_NUMPY_CPUID = {"avx2": "AVX2", "fma": "FMA3", "avx512": "AVX512F", "vnni": "AVX512VNNI", "bf16": "AVX512BF16",
                "fp16": "AVX512FP16"}


def _cpuid_features() -> dict[str, bool] | None:
    """What CPUID tells this process (through numpy's dispatch table), or None where numpy has none."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as feats
    except ImportError:  # numpy < 2
        try:
            from numpy.core._multiarray_umath import __cpu_features__ as feats
        except ImportError:
            return None
    if "AVX2" not in feats:  # not an x86 build
        return None
    return {name: bool(feats.get(np_name)) for name, np_name in _NUMPY_CPUID.items()}


def merge_cpu_features(cpuinfo: dict[str, bool], cpuid: dict[str, bool] | None) -> dict[str, bool]:
    """The features this process can use: CPUID's answer where it has one (it is what the kernels of
    oneDNN, XLA and onnxruntime dispatch on), /proc/cpuinfo for the rest (AMX, AVX-VNNI) only when both agree
    on what both see. Under an emulator (QEMU's ``-cpu EPYC-Milan``) or a masked CPUID, /proc/cpuinfo
    still describes the host, so its extras are dropped.
    """
    if cpuid is None:
        return dict(cpuinfo)
    # vnni is left out of the comparison: /proc/cpuinfo's also counts AVX-VNNI, which numpy cannot see
    agree = all(cpuinfo.get(k) == v for k, v in cpuid.items() if k != "vnni")
    merged = {k: (cpuinfo.get(k, False) and agree) for k in cpuinfo}
    merged.update(cpuid)
    if "vnni" in merged and not cpuid.get("vnni"):  # AVX-VNNI (256-bit) counts as VNNI; numpy cannot see it
        merged["vnni"] = bool(agree and cpuinfo.get("vnni"))
    return merged


def cpu_features() -> dict[str, bool]:
    """CPU features relevant to int8/bf16/fp16 speed, as this process sees them (see merge_cpu_features)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = parse_cpu_flags(f.read())
    except OSError:
        info = parse_cpu_flags("")
    return merge_cpu_features(info, _cpuid_features())


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what the platform module says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def has_vnni(features: dict[str, bool]) -> bool:
    """8-bit dot products with 32-bit sums in one instruction (AVX512-VNNI, AVX-VNNI or AMX int8)."""
    return bool(features.get("vnni") or features.get("amx"))


def ort_int8_settings_for(features: dict[str, bool]) -> dict[str, Any]:
    """onnxruntime dynamic int8 settings for a CPU with these features, and why.

    onnxruntime quantizes activations to uint8 and weights to int8 (U8S8). Without VNNI its x86 kernels
    multiply with ``vpmaddubsw``, which adds pairs of u8*s8 products into a saturating int16: with full
    8-bit weights large pairs clip (onnxruntime's quantization docs). 7-bit weights (``reduce_range``)
    keep every pair sum in range; per-channel scales win back the precision the lost bit costs. With
    VNNI (or AMX) the products accumulate exactly in int32, so full 8-bit per-tensor weights are kept.
    Measured on bert-tiny, min cosine vs float32 (tests/test_cpu_paths.py): AVX2 (QEMU EPYC-Milan, as on
    a Zen 3) 0.900 with 8-bit weights, 0.9996 with reduce_range + per_channel; AVX-512 VNNI 0.9996 with
    8-bit per-tensor weights.

    Example:
        >>> ort_int8_settings_for({"avx2": True, "vnni": False})["reduce_range"]
        True
    """
    if has_vnni(features):
        return {"per_channel": False, "reduce_range": False,
                "reason": "the CPU has VNNI/AMX int8: u8s8 products sum exactly in int32, full 8-bit weights"}
    return {"per_channel": True, "reduce_range": True,
            "reason": ("the CPU has no VNNI: onnxruntime's u8s8 kernels (vpmaddubsw) saturate 16-bit pair "
                       "sums with 8-bit weights, so weights are 7-bit (reduce_range) with per-channel scales")}


def legacy_keras_active() -> bool:
    """True when ``tf.keras`` resolves to tf_keras (Keras 2) in this process."""
    return os.environ.get("TF_USE_LEGACY_KERAS", "").lower() in ("1", "true", "yes")


def tf_tensorrt_enabled() -> tuple[bool, str]:
    """Whether this TensorFlow build can run TF-TRT, and why not."""
    try:
        from tensorflow.python.compiler.tensorrt import trt_convert
    except Exception as exc:  # pragma: no cover - depends on the TF build
        return False, f"TF-TRT module does not import: {exc}"
    try:
        enabled = bool(trt_convert._pywrap_py_utils.is_tensorrt_enabled())
    except Exception as exc:  # pragma: no cover
        return False, f"cannot ask TensorFlow whether TensorRT is enabled: {exc}"
    if enabled:
        return True, "this TensorFlow build has TF-TRT"
    import tensorflow as tf

    return False, (
        f"TensorFlow {tf.__version__} was built without TensorRT (pip builds dropped TF-TRT from 2.18; "
        "2.17 and NVIDIA's TensorFlow containers still have it)"
    )


@functools.cache
def keras_quantization_calibration_hooks_dead() -> bool:
    """Whether this Keras's GPTQ / AWQ calibration never sees an activation (keras-team/keras#23512, in Keras
    3.12-3.15): its hooks (``gptq_core.stream_hessians``, ``awq_core.stream_activations``) patch ``layer.call``,
    while a layer with a quantized dtype policy runs ``layer.quantized_call``. Read from Keras's own source:
    hooks that never mention ``quantized_call`` are the dead ones."""
    import inspect

    try:
        from keras.src.quantizers import awq_core, gptq_core
    except ImportError:  # a Keras without GPTQ / AWQ: nothing to patch
        return False
    try:
        sources = inspect.getsource(gptq_core.stream_hessians) + inspect.getsource(awq_core.stream_activations)
    except (AttributeError, OSError, TypeError):  # restructured upstream: the hooks are not these functions
        return False
    return "quantized_call" not in sources


def parent_death_signal_supported() -> bool:
    """Whether a child process can ask the kernel to signal it when its parent dies (Linux ``prctl``
    ``PR_SET_PDEATHSIG``): the local training launcher uses it so workers never outlive it."""
    return platform.system() == "Linux"


def available_memory_bytes() -> int:
    """Memory a new allocation can get on this machine now without swapping (``psutil``'s ``available``:
    free memory plus reclaimable caches). Shape checks compare their estimates with it.

    Example:
        >>> available_memory_bytes() > 0
        True
    """
    import psutil

    return int(psutil.virtual_memory().available)


def gpu_devices() -> list[str]:
    import tensorflow as tf

    return [d.name for d in tf.config.list_physical_devices("GPU")]


def gpu_compute_capabilities() -> list[tuple[int, int]]:
    import tensorflow as tf

    caps = []
    for d in tf.config.list_physical_devices("GPU"):
        cc = tf.config.experimental.get_device_details(d).get("compute_capability")
        if cc:
            caps.append(tuple(cc))
    return caps


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """What this process and machine can do. Build it with :func:`capabilities`."""

    python: str
    tensorflow: str
    keras: str
    keras_hub: str | None
    tf_keras: str | None
    legacy_keras_active: bool
    tfmot: str | None
    tf2onnx: str | None
    onnxruntime: str | None
    onnx: str | None
    tensorrt: str | None
    tf_tensorrt: bool
    tf_tensorrt_reason: str
    gpus: tuple[str, ...]
    gpu_compute_capability: tuple[tuple[int, int], ...]
    cpu: str
    cpu_count: int
    cpu_features: dict[str, bool]
    xla_available: bool
    #: The ISA cap in force (TFACCEL_CPU_ISA / ONEDNN_MAX_CPU_ISA) and the features the CPU really has.
    cpu_isa_cap: str | None = None
    cpu_features_hardware: dict[str, bool] = dataclasses.field(default_factory=dict)
    #: Whether TensorFlow's oneDNN int8 inner product (QuantizedMatMulWithBiasAndDequantize) runs here.
    onednn_int8: bool = False
    onednn_int8_reason: str = "not probed"
    #: OpenVINO and NNCF (the ``openvino`` extra), from their installed metadata.
    openvino: str | None = None
    nncf: str | None = None

    @property
    def tensorrt_route(self) -> tuple[str | None, str]:
        """Which TensorRT route works here ("tftrt", "tensorrt" or None) and why."""
        if not self.gpus:
            have = (f"TF-TRT {'is' if self.tf_tensorrt else 'is not'} in this TensorFlow; "
                    f"the `tensorrt` package is {self.tensorrt or 'not installed'}")
            return None, f"no NVIDIA GPU visible to TensorFlow; TensorRT needs one ({have})"
        if self.tf_tensorrt:
            return "tftrt", "TF-TRT is built into this TensorFlow"
        if self.tensorrt:
            return "tensorrt", (
                f"{self.tf_tensorrt_reason}; the `tensorrt` package {self.tensorrt} builds engines "
                "from the `onnx` step's model"
            )
        return None, f"{self.tf_tensorrt_reason}; install the `trt` extra for the ONNX route"

    @property
    def has_vnni(self) -> bool:
        """8-bit dot products with 32-bit sums in one instruction (AVX512-VNNI, AVX-VNNI or AMX int8)."""
        return has_vnni(self.cpu_features)

    def int8_kernel_forms(self) -> dict[str, tuple[bool, str]]:
        """Which forms of the int8 step's products run here (see tfaccel.quantization.int8_kernels)."""
        xla_why = "XLA compiles on this TensorFlow" if self.xla_available else "XLA is not available here"
        return {
            "xla": (self.xla_available, xla_why),
            "onednn": (self.onednn_int8, self.onednn_int8_reason),
            "keras": (True, "Keras' own int8 calls run on every TensorFlow"),
        }

    def ort_int8_settings(self) -> dict[str, Any]:
        """onnxruntime dynamic int8 settings for this CPU, and why (see :func:`ort_int8_settings_for`)."""
        return ort_int8_settings_for(self.cpu_features)

    def ort_qdq_fused(self) -> tuple[bool, str]:
        """Whether onnxruntime should fuse Q/DQ graphs into its int8 kernels when checking them on this CPU.

        A Q/DQ graph (the TensorRT int8 route's ONNX) means exact int8 x int8 -> int32 products, as
        TensorRT computes them. onnxruntime fuses it into u8s8 kernels, which saturate on CPUs without
        VNNI; unfused, the DequantizeLinear -> float MatMul path computes the same products exactly.
        """
        if self.has_vnni:
            return True, "the CPU has VNNI/AMX: onnxruntime's fused int8 kernels sum exactly"
        return False, ("the CPU has no VNNI: fused u8s8 kernels saturate, so the Q/DQ graph runs unfused "
                       "(float DequantizeLinear -> MatMul, the exact int8 products TensorRT computes)")

    def openvino_precision(self, requested: str = "auto") -> tuple[str, str]:
        """The inference precision OpenVINO's CPU plugin should compute in here, and why.

        OpenVINO's CPU plugin computes in bf16 by default where the CPU has bf16 instructions (AVX512-BF16,
        AMX) and in f32 elsewhere. tfaccel always states the precision explicitly, decided here, so an ISA
        cap (``TFACCEL_CPU_ISA=avx2``) gives the f32 an AVX2-only CPU would get.

        Args:
            requested: "auto" (bf16 where native, else f32), "f32" or "bf16".

        Raises:
            ValueError: ``requested`` is not one of those, or "bf16" on a CPU without bf16 instructions.

        Example:
            >>> with override_capabilities(cpu_isa="avx2"):
            ...     capabilities().openvino_precision("auto")[0]
            'f32'
        """
        if requested not in ("auto", "f32", "bf16"):
            raise ValueError(f"inference_precision must be auto, f32 or bf16. Received: {requested!r}")
        native, why = self.half_precision("mixed_bfloat16")
        if self.gpus:  # OpenVINO runs on the CPU here; a GPU says nothing about the CPU's bf16
            flags = self.cpu_features
            native = bool(flags.get("bf16") or flags.get("amx"))
            why = "the CPU has bfloat16 instructions (bf16/AMX)" if native else "the CPU has no bfloat16 instructions"
        if requested == "f32":
            return "f32", "set by the user"
        if requested == "bf16":
            if not native:
                raise ValueError(f"inference_precision=bf16 needs a CPU with bfloat16 instructions: {why}. Use "
                                 "auto or f32.")
            return "bf16", "set by the user"
        if native:
            return "bf16", f"{why}: OpenVINO's CPU default, matmuls in bf16"
        return "f32", f"{why}: f32"

    def openvino_int8_settings(self) -> dict[str, Any]:
        """NNCF's weight range for int8 on this CPU (``overflow_fix``), and why.

        Without VNNI, OpenVINO's int8 kernels multiply with ``vpmaddubsw``, whose int16 pair sums saturate
        with full 8-bit weights (NNCF's ``OverflowFix`` docs); half-range (7-bit) weights avoid it. With VNNI
        or AMX the products sum exactly in int32 and full-range weights are kept.

        Example:
            >>> with override_capabilities(cpu_isa="avx2"):
            ...     capabilities().openvino_int8_settings()["overflow_fix"]
            'enable'
        """
        if self.has_vnni:
            return {"overflow_fix": "disable", "reason": "the CPU has VNNI/AMX: int8 products sum exactly, full-range "
                                                         "8-bit weights"}
        return {"overflow_fix": "enable", "reason": "the CPU has no VNNI: u8s8 pair sums saturate int16 with full "
                                                    "8-bit weights, so weights use half the range (7 bits)"}

    def half_precision(self, policy: str) -> tuple[bool, str]:
        """Whether this machine has fast math for a mixed policy, and why (or why not)."""
        half = "bfloat16" if "bfloat16" in policy else "float16"
        if self.gpus:
            need = (8, 0) if half == "bfloat16" else (7, 0)
            if any(cc >= need for cc in self.gpu_compute_capability):
                return True, f"GPU with compute capability >= {need[0]}.{need[1]} has {half} tensor cores"
            return False, f"the GPU lacks {half} tensor cores (needs compute capability {need[0]}.{need[1]}+)"
        flag = "bf16" if half == "bfloat16" else "fp16"
        if self.cpu_features.get(flag) or (half == "bfloat16" and self.cpu_features.get("amx")):
            return True, f"the CPU has {half} instructions ({flag}/AMX)"
        return False, (f"no GPU and the CPU ({self.cpu}) has no {half} instructions (avx512_{flag}/AMX), so "
                       f"{half} is emulated through float32 conversions")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["gpus"] = list(self.gpus)
        d["tensorrt_route"], d["tensorrt_route_reason"] = self.tensorrt_route
        d["int8_kernel_forms"] = {k: {"runs": ok, "reason": why} for k, (ok, why) in self.int8_kernel_forms().items()}
        d["ort_int8_settings"] = self.ort_int8_settings()
        d["openvino_precision"] = dict(zip(("precision", "reason"), self.openvino_precision(), strict=True))
        d["openvino_int8_settings"] = self.openvino_int8_settings()
        d["half_precision"] = {p: dict(zip(("native", "reason"), self.half_precision(p), strict=True))
                               for p in ("mixed_bfloat16", "mixed_float16")}
        return d

    def format_text(self) -> str:
        d = self.to_dict()
        feats = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in self.cpu_features.items())
        lines = [
            f"python        {d['python']}",
            f"tensorflow    {d['tensorflow']}",
            f"keras         {d['keras']} ({'tf_keras is tf.keras' if d['legacy_keras_active'] else 'Keras 3 is tf.keras'})",
            f"keras-hub     {d['keras_hub'] or 'not installed'}",
            f"tf-keras      {d['tf_keras'] or 'not installed'}",
            f"tfmot         {d['tfmot'] or 'not installed'}",
            f"tf2onnx       {d['tf2onnx'] or 'not installed'}",
            f"onnxruntime   {d['onnxruntime'] or 'not installed'}",
            f"tensorrt      {d['tensorrt'] or 'not installed'}",
            f"openvino      {d['openvino'] or 'not installed'} (nncf {d['nncf'] or 'not installed'}); CPU inference "
            f"precision {d['openvino_precision']['precision']}: {d['openvino_precision']['reason']}",
            f"TF-TRT        {'yes' if d['tf_tensorrt'] else 'no'}: {d['tf_tensorrt_reason']}",
            f"TensorRT route {d['tensorrt_route'] or 'none'}: {d['tensorrt_route_reason']}",
            f"gpus          {', '.join(d['gpus']) or 'none'}",
            f"xla           {'yes' if d['xla_available'] else 'no'}",
            f"cpu           {d['cpu']} ({d['cpu_count']} cores)",
            f"cpu features  {feats}" + (f" (capped to {d['cpu_isa_cap']})" if d["cpu_isa_cap"] else ""),
            "int8 kernels  " + "; ".join(f"{k} {'yes' if v['runs'] else 'no'}" for k, v in d["int8_kernel_forms"].items())
            + f" (oneDNN: {d['onednn_int8_reason']})",
            f"ort int8      per_channel={d['ort_int8_settings']['per_channel']}, "
            f"reduce_range={d['ort_int8_settings']['reduce_range']}: {d['ort_int8_settings']['reason']}",
        ] + [f"{p:15s}{'native' if v['native'] else 'emulated'}: {v['reason']}" for p, v in d["half_precision"].items()]
        return "\n".join(lines)


def _xla_available() -> bool:
    import tensorflow as tf

    try:
        return bool(tf.function(lambda x: x + 1, jit_compile=True)(tf.constant(1.0)) == 2.0)
    except Exception:
        return False


def _onednn_int8_probe(cap: str | None, hardware: dict[str, bool]) -> tuple[bool, str]:
    """Run TensorFlow's oneDNN int8 inner product once on a tiny product and check the numbers."""
    import numpy as np
    import tensorflow as tf

    if cap is not None and not ISA_LEVELS[cap] >= {"avx512"} and hardware.get("avx512"):
        # TensorFlow's quantized op decides from CPUID, not from ONEDNN_MAX_CPU_ISA, so a capped run would
        # still find it; on real AVX2-only CPUs (Zen 3, and QEMU's EPYC-Milan) it fails, as here.
        return False, (f"treated as unavailable under the ISA cap {cap}: TensorFlow's oneDNN int8 op fails on "
                       "AVX2-only CPUs (seen on AMD Zen 3)")
    x = np.linspace(-1, 1, 32, dtype=np.float32).reshape(2, 16)
    kq = np.arange(-64, 64, dtype=np.int8).reshape(16, 8)
    try:
        acc = tf.raw_ops.QuantizedMatMulWithBiasAndDequantize(
            a=tf.bitcast(tf.constant((np.round(x * 127).astype(np.int16) + 128).astype(np.uint8)), tf.quint8),
            b=tf.bitcast(tf.constant(kq), tf.qint8), bias=tf.zeros([8], tf.float32),
            min_a=tf.constant(0.0), max_a=tf.constant(255.0), min_b=tf.constant(-127.0), max_b=tf.constant(127.0),
            min_freezed_output=tf.constant(-1.0), max_freezed_output=tf.constant(1.0), Toutput=tf.float32,
            input_quant_mode="SCALED",
        ).numpy()
    except Exception as exc:  # no kernel in builds without oneDNN, or it cannot run on this CPU
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return False, f"TensorFlow's oneDNN int8 op does not run here ({type(exc).__name__}: {first[:160]})"
    codes = (np.round(x * 127).astype(np.int64) + 128)
    want = (codes @ kq.astype(np.int64)).astype(np.float32)
    if acc.shape != want.shape or not np.allclose(acc, want, atol=0.5):
        return False, "TensorFlow's oneDNN int8 op gives wrong results on this CPU"
    return True, "TensorFlow's oneDNN int8 inner product runs and is exact here"


@functools.lru_cache(maxsize=1)
def probed_capabilities() -> Capabilities:
    """Probe versions, optional packages and hardware once per process (no overrides applied)."""
    import keras
    import tensorflow as tf

    tftrt, reason = tf_tensorrt_enabled()
    hardware = cpu_features()
    cap, cap_source = cpu_isa_cap()
    onednn, onednn_why = _onednn_int8_probe(cap, hardware)
    return Capabilities(
        python=platform.python_version(),
        tensorflow=tf.__version__,
        keras=keras.__version__,
        keras_hub=package_version("keras-hub"),
        tf_keras=package_version("tf-keras"),
        legacy_keras_active=legacy_keras_active(),
        tfmot=package_version("tensorflow-model-optimization"),
        tf2onnx=package_version("tf2onnx"),
        onnxruntime=package_version("onnxruntime") or package_version("onnxruntime-gpu"),
        onnx=package_version("onnx"),
        tensorrt=package_version("tensorrt") or package_version("tensorrt-cu12") or package_version("tensorrt-cu13"),
        tf_tensorrt=tftrt,
        tf_tensorrt_reason=reason,
        gpus=tuple(gpu_devices()),
        gpu_compute_capability=tuple(gpu_compute_capabilities()),
        cpu=cpu_model(),
        cpu_count=os.cpu_count() or 1,
        cpu_features=cap_cpu_features(hardware, cap),
        xla_available=_xla_available(),
        cpu_isa_cap=cap_source or None,
        cpu_features_hardware=hardware,
        onednn_int8=onednn,
        onednn_int8_reason=onednn_why,
        openvino=package_version("openvino"),
        nncf=package_version("nncf"),
    )


_OVERRIDES: list[dict[str, Any]] = []


def capabilities() -> Capabilities:
    """What this process and machine can do: probed once per process, with any active
    :func:`override_capabilities` applied. Every hardware decision in tfaccel reads it.

    Example:
        >>> caps = capabilities()
        >>> caps.cpu_features["avx2"] in (True, False)
        True
    """
    caps = probed_capabilities()
    for changes in _OVERRIDES:
        caps = dataclasses.replace(caps, **changes)
    return caps


@contextlib.contextmanager
def override_capabilities(*, cpu_isa: str | None = None, **changes: Any) -> Iterator[Capabilities]:
    """Make :func:`capabilities` report other hardware inside the block: to test the branch of a hardware
    decision that this machine would not take.

    Args:
        cpu_isa: cap the CPU features to an ISA level of :data:`ISA_LEVELS` (e.g. "avx2": no AVX-512, no
            VNNI, no bf16), as ``TFACCEL_CPU_ISA`` does for a whole process.
        **changes: Capabilities fields to replace; ``cpu_features`` may be partial (merged).

    Example:
        >>> with override_capabilities(cpu_isa="avx2", onednn_int8=False):
        ...     capabilities().ort_int8_settings()["reduce_range"]
        True
    """
    fields = {f.name for f in dataclasses.fields(Capabilities)}
    unknown = set(changes) - fields
    if unknown:
        raise ValueError(f"Unknown Capabilities fields {sorted(unknown)}. Known: {sorted(fields)}")
    base = capabilities()
    if "cpu_features" in changes:
        changes["cpu_features"] = {**base.cpu_features, **changes["cpu_features"]}
    if cpu_isa is not None:
        if cpu_isa not in ISA_LEVELS:
            raise ValueError(f"cpu_isa must be one of {', '.join(ISA_LEVELS)}. Received: cpu_isa={cpu_isa!r}")
        changes["cpu_features"] = cap_cpu_features(changes.get("cpu_features", base.cpu_features), cpu_isa)
        changes.setdefault("cpu_isa_cap", f"override_capabilities(cpu_isa={cpu_isa!r})")
    if "gpus" in changes:
        changes["gpus"] = tuple(changes["gpus"])
    _OVERRIDES.append(changes)
    try:
        yield capabilities()
    finally:
        _OVERRIDES.remove(changes)


def require(module: str, pip_name: str | None = None, extra: str | None = None, purpose: str = ""):
    """Import an optional dependency, or raise MissingDependencyError saying what to install."""
    from tfaccel.errors import MissingDependencyError

    if importlib.util.find_spec(module.split(".")[0]) is None:
        how = f"pip install 'tfaccel[{extra}]'" if extra else f"pip install {pip_name or module}"
        why = f" for {purpose}" if purpose else ""
        raise MissingDependencyError(f"`{module}` is needed{why} but is not installed. Run: {how}")
    return importlib.import_module(module)
