"""The dispatcher service: a GenerationRun spec in, prompts on NATS JetStream out, progress back.

It is the only writer of a run's queue. It builds the prompts, writes the prompt manifest to
storage, publishes every prompt that has no completion yet (so a restart or a second start
resumes instead of paying for generations twice), and follows the run from the stream's state
and the generator workers' events until every prompt has a completion or a recorded failure.

Modules: `state` (what a run's status is and how it moves, pure), `runs` (the RunManager that
does the work), `server` (the thin gRPC servicer, `create_server()` and `main()`), `client`
(`DispatcherClient`), `proto` (the generated messages). Importing this package is cheap; the
gRPC and NATS machinery loads with the submodules.
"""
