"""Command-line options of the model server and the process that serves it.

One set of options for `cosmo serve-model` and `python -m cosmoforge.services.modelserver`,
so the two cannot drift: which engine, then that engine's settings.
"""

from __future__ import annotations

import argparse

from cosmoforge.services.modelserver.engine import Engine


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument(
        "--engine", choices=("llama", "canned"), default="llama",
        help="llama: the embedded SmolLM2 on llama.cpp; canned: fixed answers (load tests)",
    )  # fmt: skip
    llama = parser.add_argument_group("llama engine")
    llama.add_argument("--context", type=int, default=2048, help="context length in tokens, per request")
    llama.add_argument("--threads", type=int, help="CPU threads for llama.cpp")
    llama.add_argument(
        "--weights", choices=("q4_1", "q8_0"), default="q4_1",
        help="q4_1: the shipped file; q8_0: requantized once into ~/.cache/cosmoforge; batches better",
    )  # fmt: skip
    llama.add_argument(
        "--parallel", type=int, default=1,
        help="requests decoded together in one batch (continuous batching); 1 (default): one at a "
        "time, which on a few shared CPU cores is as fast and keeps each request's latency short",
    )  # fmt: skip
    canned = parser.add_argument_group("canned engine")
    canned.add_argument("--latency", type=float, default=0.05, help="seconds before each answer")
    canned.add_argument("--tokens", type=int, default=16, help="words in each canned answer")
    canned.add_argument("--model", default="fake/canned-model", help="the model name it serves")
    canned.add_argument("--check-model", action="store_true", help="404 for other model names, like vLLM")
    canned.add_argument("--fail-every", type=int, default=0, help="answer 503 to every n-th request")


def engine_from(args: argparse.Namespace) -> Engine:
    if args.engine == "canned":
        from cosmoforge.services.modelserver.canned import Behaviour, CannedEngine

        return CannedEngine(
            Behaviour(args.model, args.latency, args.tokens, args.check_model, args.fail_every)
        )
    return llama_engine(args.parallel, n_ctx=args.context, threads=args.threads, weights=args.weights)


def llama_engine(
    parallel: int, n_ctx: int = 2048, threads: int | None = None, weights: str = "q4_1"
) -> Engine:
    from cosmoforge.services.modelserver.llama import (
        EMBEDDED_MODEL_ID,
        LlamaModel,
        SequentialEngine,
        weights_path,
    )

    model = LlamaModel(weights_path(weights), EMBEDDED_MODEL_ID, n_ctx=n_ctx, threads=threads, dtype=weights)
    if parallel <= 1:
        return SequentialEngine(model)
    from cosmoforge.services.modelserver.batching import BatchedEngine

    return BatchedEngine(model, parallel)


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from cosmoforge.services.modelserver.app import create_app

    uvicorn.run(
        create_app(engine_from(args)), host=args.host, port=args.port, log_level="warning", access_log=False
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="TGI's and OpenAI's HTTP APIs around a model engine")
    add_arguments(parser)
    return serve(parser.parse_args(argv))
