"""Which extra inference-server arguments a spec may add: tuning, never identity or code loading.

`spec.generation.serving.extraArgs` reaches the TGI or vLLM command line of a pod on a shared GPU
node. Tuning flags (batching, memory, precision, kernels) are the reason the field exists; flags
that change where the server listens, which model or files it loads, where it sends telemetry,
or that run the model repository's own Python (`--trust-remote-code`) are not, so each engine
has an allow-list and anything else is a spec problem. Remote code is allowed only through the
explicit `serving.trustRemoteCode: true`, which a reviewer can see in the spec.
"""

from __future__ import annotations

from collections.abc import Sequence

from cosmoforge.spec.model import Engine

FIELD = "spec.generation.serving.extraArgs"
REMOTE_CODE_FLAG = "--trust-remote-code"

# text-generation-launcher's tuning flags (TGI 3.x).
TGI_FLAGS = frozenset(
    {
        "--quantize",
        "--dtype",
        "--kv-cache-dtype",
        "--speculate",
        "--max-concurrent-requests",
        "--max-best-of",
        "--max-stop-sequences",
        "--max-top-n-tokens",
        "--max-batch-prefill-tokens",
        "--max-batch-total-tokens",
        "--max-batch-size",
        "--max-waiting-tokens",
        "--max-client-batch-size",
        "--waiting-served-ratio",
        "--cuda-graphs",
        "--cuda-memory-fraction",
        "--rope-scaling",
        "--rope-factor",
        "--disable-custom-kernels",
        "--enable-prefill-logprobs",
        "--payload-limit",
        "--json-output",
        "--disable-grammar-support",
        "--sharded",
    }
)

# vLLM's OpenAI server tuning flags (vLLM 0.11).
VLLM_FLAGS = frozenset(
    {
        "--dtype",
        "--quantization",
        "--kv-cache-dtype",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--gpu-memory-utilization",
        "--swap-space",
        "--block-size",
        "--enable-prefix-caching",
        "--no-enable-prefix-caching",
        "--enable-chunked-prefill",
        "--no-enable-chunked-prefill",
        "--enforce-eager",
        "--max-seq-len-to-capture",
        "--seed",
        "--pipeline-parallel-size",
        "--max-logprobs",
        "--disable-log-requests",
        "--disable-log-stats",
        "--tokenizer-mode",
        "--generation-config",
        "--disable-custom-all-reduce",
        "--async-scheduling",
    }
)


def allowed_flags(engine: Engine) -> frozenset[str]:
    return VLLM_FLAGS if engine == Engine.vllm else TGI_FLAGS


def problems(engine: Engine, args: Sequence[str]) -> list[str]:
    """Why each refused argument is refused (empty: all allowed). Values follow their flag, as a
    separate argument or after `=`; a value with no flag before it is refused too, so that
    nothing can smuggle a positional argument in."""
    allowed = allowed_flags(engine)
    found: list[str] = []
    after_flag = False
    for arg in args:
        if not arg.startswith("-"):
            if not after_flag:
                found.append(f"{arg!r} is not a flag's value")
            after_flag = False
            continue
        flag = arg.split("=", 1)[0]
        if flag == REMOTE_CODE_FLAG:
            found.append(
                f"{flag} runs the model repository's code: set serving.trustRemoteCode: true instead"
            )
        elif flag not in allowed:
            found.append(f"{flag} is not an allowed {engine} tuning flag")
        after_flag = "=" not in arg
    return found
