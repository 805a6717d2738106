"""The model server: TGI's and OpenAI's HTTP APIs around an engine it does not look inside.

`app.py` is the server (FastAPI), `api.py` the wire formats, `engine.py` what an engine must
do. Engines: `llama.SequentialEngine` (llama.cpp, one request at a time),
`batching.BatchedEngine` (llama.cpp, continuous batching of `--parallel` requests) and
`canned.CannedEngine` (fixed answers after a fixed latency, for tests and load benchmarks).
`cosmo serve-model` and `python -m cosmoforge.services.modelserver` run it (`serve.py`).
Nothing is imported here: `cosmo` registers its options from `serve.py` on every start-up.
"""
