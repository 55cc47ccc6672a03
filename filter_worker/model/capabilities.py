"""What a device runs natively: the CPU's flags (or the GPU's bfloat16), the engines worth measuring, and emulation.

AMX and AVX-512 BF16 run bfloat16 natively, VNNI (and AMX-INT8) run int8 natively; an AVX2-only CPU
emulates bfloat16, more slowly than float32. ``model/precision.py`` measures only what is native.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

# The CPU flags (Linux /proc/cpuinfo names) that decide which precisions run natively.
FLAGS: tuple[str, ...] = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
BF16_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})
INT8_FLAGS = frozenset({"amx_int8", "avx512_vnni", "avx_vnni"})
CUDA_BF16 = "cuda_bf16"  # not a CPU flag: the GPU runs bfloat16 (compute capability 8.0 and later)


@dataclass(frozen=True, slots=True)
class Engine:
    """A backend and precision: what ``FILTER_MODEL__BACKEND`` and ``FILTER_MODEL__DTYPE`` name."""

    backend: str
    dtype: str

    @property
    def name(self) -> str:
        return f"{self.backend} {self.dtype}"


REFERENCE = Engine("torch", "float32")  # what every candidate is measured against


def cpu_capabilities(cpuinfo: str | None = None) -> frozenset[str]:
    """The precision-relevant flags of this CPU, from /proc/cpuinfo (or ``cpuinfo``'s text).

    Without /proc/cpuinfo (not Linux), torch's own capability says whether AVX-512 or AVX2 is there,
    but not whether bfloat16 or VNNI are: nothing is then run that might be emulated.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return _torch_capabilities()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split()) & frozenset(FLAGS)
    return _torch_capabilities()


def _torch_capabilities() -> frozenset[str]:
    import torch

    capability = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    return frozenset(
        {"avx512f", "avx2"} if capability.startswith("AVX512") else {"avx2"} if capability == "AVX2" else ()
    )


def device_capabilities(device: str) -> frozenset[str]:
    """The CPU's flags, or on CUDA whether the GPU runs bfloat16."""
    if not device.startswith("cuda"):
        return cpu_capabilities()
    import torch

    return frozenset({CUDA_BF16}) if torch.cuda.is_bf16_supported() else frozenset()


def native_candidates(
    device: str, capabilities: frozenset[str], backends: Sequence[str], graphs: Sequence[str]
) -> list[Engine]:
    """The engines other than torch float32 that ``device`` runs natively, among ``backends``.

    On CUDA: float16 (tensor cores), and bfloat16 where the GPU has it. On a CPU: torch bfloat16 with
    AMX or AVX-512 BF16; int8 (torch's dynamic quantization, ONNX Runtime's int8 graph) with VNNI or
    AMX-INT8; ONNX Runtime float32 anywhere. ONNX graphs only where ``graphs`` (the dtypes exported
    into the model directory) has them: start-up never writes into the model directory. OpenVINO
    (``backends`` names it only where it is installed): bfloat16 with AMX or AVX-512 BF16. Its float32
    ran within 2 % of eager float32 on the AMX CPU measured, so it is not worth a check at every start
    on CPUs without bfloat16; an explicit ``FILTER_MODEL__BACKEND=openvino`` still measures it.
    """
    found: list[Engine] = []
    if device.startswith("cuda"):
        if "torch" in backends:
            found.append(Engine("torch", "float16"))
            if CUDA_BF16 in capabilities:
                found.append(Engine("torch", "bfloat16"))
        return found
    bf16, int8 = bool(capabilities & BF16_FLAGS), bool(capabilities & INT8_FLAGS)
    if "torch" in backends:
        found += [Engine("torch", "bfloat16")] if bf16 else []
        found += [Engine("torch", "int8")] if int8 else []
    if "onnx" in backends:
        found += [Engine("onnx", "float32")] if "float32" in graphs else []
        found += [Engine("onnx", "int8")] if int8 and "int8" in graphs else []
    if "openvino" in backends:
        found += [Engine("openvino", "bfloat16")] if bf16 else []
    return found


def emulation_warning(dtype: str, device: str, capabilities: frozenset[str]) -> str | None:
    """For an explicit ``FILTER_MODEL__DTYPE`` the device only emulates: the sentence naming the faster native one."""
    if device.startswith("cuda"):
        if dtype == "bfloat16" and CUDA_BF16 not in capabilities:
            return "FILTER_MODEL__DTYPE=bfloat16: this GPU emulates bfloat16; float16 runs natively and faster"
        return None
    if dtype == "bfloat16" and not capabilities & BF16_FLAGS:
        native = "int8 (VNNI)" if capabilities & INT8_FLAGS else "float32"
        return (
            f"FILTER_MODEL__DTYPE=bfloat16: this CPU has no AMX or AVX-512 BF16, so bfloat16 is emulated and slower "
            f"than float32; {native} runs natively (or leave FILTER_MODEL__DTYPE=auto to measure)"
        )
    if dtype == "int8" and not capabilities & INT8_FLAGS and capabilities & BF16_FLAGS:
        return "FILTER_MODEL__DTYPE=int8: this CPU has no VNNI; bfloat16 runs natively (AMX or AVX-512 BF16)"
    return None
