"""Dense bf16 tensor-core peaks of data-centre GPUs, for model FLOPs utilisation (MFU).

One table for the trainer's progress records and `benchmarks/gpu_train.py`, so their MFUs
compare; standard library only, because the benchmark runs where only torch is installed.
"""

from __future__ import annotations

# TFLOPS from NVIDIA's data sheets, most specific name first (a name matches as a substring).
BF16_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.4),
    ("H200", 989.4),
    ("H100", 989.4),
    ("H800", 989.4),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("L40S", 362.0),
)


def peak_tflops(gpu_name: str) -> float | None:
    for name, tflops in BF16_PEAK_TFLOPS:
        if name.lower() in gpu_name.lower():
            return tflops
    return None
