"""The dispatcher service over real gRPC, real nats-server, real generator processes.

The inference server is the embedded model behind the fault-injecting proxy wherever what is
generated matters; the canned fake server stands in only where the wire protocol is the point
(a vLLM-style server refusing an unknown model name).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pyarrow.parquet as pq
import pytest
import yaml
from nats.js.errors import NotFoundError

from conftest import small_run, write_spec
from cosmoforge import queue
from cosmoforge.generation.compact import FAILED_TABLE, read_dataset
from cosmoforge.queue import EmbeddedNats, free_port
from cosmoforge.runs.manager import RunManager
from cosmoforge.runs.status import RunStatus, WorkerEvent, apply_event, outcome
from cosmoforge.services import protogen
from cosmoforge.services.dispatcher.client import DispatcherClient, DispatcherError
from cosmoforge.services.dispatcher.server import create_server
from cosmoforge.services.modelserver.canned import Behaviour, FakeServer
from cosmoforge.storage import GENERATIONS, PROMPTS, RunStore
from faults import Faults, FaultyProxy
from processes import COSMO, final_status, services, until


def spec(name: str, out: Path, limit: int | None = None, **generation: Any) -> dict[str, Any]:
    document = small_run(name, **generation)
    document["spec"]["output"] = {"uri": str(out)}
    if limit is not None:
        document["spec"]["prompts"]["limit"] = limit
    return document


@contextlib.asynccontextmanager
async def dispatcher(nats_url: str) -> AsyncIterator[DispatcherClient]:
    """The dispatcher in this process (its gRPC still over a socket), for tests that restart nothing;
    namespaced, as `cosmo dispatcher` runs it."""
    manager = RunManager(nats_url, poll_seconds=0.2, ack_wait=3.0, namespaced=True)
    server, _, port = create_server(manager, 0, "127.0.0.1")
    await manager.start()
    await server.start()
    try:
        async with DispatcherClient(f"127.0.0.1:{port}") as client:
            yield client
    finally:
        await server.stop(None)
        await manager.close()


async def queued(client: DispatcherClient, run: str, count: int) -> dict[str, Any] | None:
    status = await client.get_status(run)
    return status if status["phase"] == "Generating" and status["queued"] == count else None


# --- pure rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompts", "generated", "failed", "phase", "words"),
    [
        (10, 10, 0, "Succeeded", "all 10 prompts generated"),
        (10, 8, 2, "Succeeded", "8 generated, 2 failed: connection x2"),
        (10, 0, 10, "Failed", "all 10 prompts failed: connection x10"),
        (10, 7, 2, "Failed", "1 of 10 prompts have neither"),
        (0, 0, 0, "Succeeded", "no prompts"),
    ],
)
def test_outcome_names_phase_and_reason(
    prompts: int, generated: int, failed: int, phase: str, words: str
) -> None:
    samples = {"connection": (failed, "Cannot connect to host")} if failed else {}
    result = outcome(prompts, generated, failed, samples)
    assert result.phase == phase and words in result.message


def test_worker_events_never_count_past_the_manifest() -> None:
    status = RunStatus(run="r", prompts=5, generated=3)
    apply_event(status, WorkerEvent(generated=4, failed=1, tokens=40, errors={"timeout": 1}))
    assert (status.generated, status.failed, status.tokens, status.errors) == (5, 0, 40, {"timeout": 1})


def test_generated_grpc_code_is_rebuilt_when_stale() -> None:
    protogen.ensure_generated()
    digest = protogen.source_digest(protogen.proto_files())
    assert protogen.generated_digest() == digest
    protogen.STAMP.write_text('SOURCE_DIGEST = "' + "0" * 64 + '"\n')
    protogen.ensure_generated()
    assert protogen.generated_digest() == digest
    from cosmoforge._proto.v1 import dispatcher_pb2

    assert dispatcher_pb2.DESCRIPTOR.services_by_name["Dispatcher"].full_name == "cosmoforge.v1.Dispatcher"


async def test_publish_all_confirms_each_message_and_counts_duplicates(nats_server: EmbeddedNats) -> None:
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await queue.ensure_stream(js, "pub")
        messages = [(f"id-{i}", b"x" * 50) for i in range(5000)]
        first = await queue.publish_all(nc, "pub", messages, window=256)
        again = await queue.publish_all(nc, "pub", [*messages[:1000], ("new", b"y")], window=256)
        assert (first.stored, first.duplicates) == (5000, 0)
        assert (again.stored, again.duplicates) == (1, 1000)
        assert await queue.remaining(js, "pub") == 5001
    finally:
        await nc.close()


# --- the service ----------------------------------------------------------------------------


async def test_invalid_input_is_refused_with_field_and_reason(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    good = spec("fine", tmp_path)
    zero = copy.deepcopy(good)
    zero["spec"]["generation"]["concurrency"] = 0
    typo = copy.deepcopy(good)
    typo["spec"]["generation"]["modle"] = "x"
    cases = [
        (yaml.safe_dump(zero), "spec.generation.concurrency", "greater than or equal to 1"),
        (yaml.safe_dump(typo), "spec.generation.modle", "unknown field"),
        ("spec: [unclosed", "line 1", "invalid YAML"),
        ("", "(root)", "expected one YAML document"),
    ]
    async with dispatcher(nats_server.url) as client:
        for text, field, reason in cases:
            with pytest.raises(DispatcherError) as caught:
                await client.start_run(text)
            assert caught.value.code == "INVALID_ARGUMENT"
            assert any(f == field and reason in r for f, r in caught.value.problems), caught.value.problems
            assert field in caught.value.details
        for call in (client.get_status, client.cancel):
            with pytest.raises(DispatcherError) as missing:
                await call("nope")
            assert missing.value.code == "NOT_FOUND"
        assert await client.list_runs() == []

        # A spec can be valid and its seeds still unreadable: the run fails and says why.
        broken = copy.deepcopy(good)
        broken["metadata"]["name"] = "noseeds"
        broken["spec"]["seeds"] = [{"name": "web", "kind": "web", "uri": str(tmp_path / "missing.jsonl")}]
        await client.start_run(yaml.safe_dump(broken))
        status = await final_status(client, "noseeds", timeout=60)
        assert status["phase"] == "Failed" and "no such file" in status["message"]

    nc = await nats.connect(nats_server.url)
    try:
        with pytest.raises(NotFoundError):  # nothing was queued for a refused spec
            await nc.jetstream().stream_info(queue.stream_name("fine"))
    finally:
        await nc.close()


async def test_cancel_drops_the_queue_and_the_registry_outlives_the_dispatcher(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    document = spec("cancelme", tmp_path)
    text = yaml.safe_dump(document)
    async with dispatcher(nats_server.url) as client:
        started = await client.start_run(text)
        assert started["run"] == "cancelme" and started["phase"] in ("Pending", "Generating")
        await until(lambda: queued(client, "cancelme", 10), 60, what="10 prompts queued")
        assert (await client.start_run(text))["phase"] == "Generating"  # the same spec again: no-op

        other = copy.deepcopy(document)
        other["spec"]["generation"]["maxNewTokens"] = 99
        with pytest.raises(DispatcherError) as conflict:
            await client.start_run(yaml.safe_dump(other))
        assert conflict.value.code == "FAILED_PRECONDITION"

        cancelled = await client.cancel("cancelme")
        assert cancelled["phase"] == "Cancelled" and cancelled["queued"] == 0
        assert "10 prompts still queued" in cancelled["message"]
        assert (await client.cancel("cancelme"))["phase"] == "Cancelled"
        nc = await nats.connect(nats_server.url)
        with pytest.raises(NotFoundError):
            await nc.jetstream().stream_info(queue.stream_name("cancelme"))
        await nc.close()

        # Cancelling forgot the queue's duplicate window too: the same prompts queue again.
        await client.start_run(text)
        await until(lambda: queued(client, "cancelme", 10), 60, what="prompts queued again")

    # Another dispatcher on the same NATS finds the active run in the registry and resumes it.
    async with dispatcher(nats_server.url) as client:
        await until(lambda: queued(client, "cancelme", 10), 60, what="run resumed")
        assert [status["run"] for status in await client.list_runs()] == ["cancelme"]
        await client.cancel("cancelme")
    async with dispatcher(nats_server.url) as client:
        assert (await client.get_status("cancelme"))["phase"] == "Cancelled"


async def all_queued(client: DispatcherClient, run: str) -> dict[str, Any] | None:
    status = await client.get_status(run)
    ready = status["phase"] == "Generating" and status["queued"] == status["prompts"] > 0
    return status if ready else None


async def stream_messages(nats_url: str, run: str) -> int | None:
    """Messages in the run's stream; None when it has none."""
    nc = await nats.connect(nats_url)
    try:
        return int((await nc.jetstream().stream_info(queue.stream_name(run))).state.messages)
    except NotFoundError:
        return None
    finally:
        await nc.close()


def in_namespace(document: dict[str, Any], namespace: str) -> dict[str, Any]:
    document = copy.deepcopy(document)
    document["metadata"]["namespace"] = namespace
    return document


async def test_the_same_name_in_two_namespaces_is_two_runs_that_finish_on_their_own(
    nats_server: EmbeddedNats, tmp_path: Path, model_server: str
) -> None:
    out = tmp_path / "out"
    first, second = "team-a/twin", "team-b/twin"
    documents = {}
    for key, limit in ((first, 2), (second, 5)):
        document = in_namespace(spec("twin", out, limit=limit, maxNewTokens=4), key.split("/")[0])
        document["spec"]["prompts"]["maxSeedChars"] = 100  # short prompts: the CPU model answers fast
        documents[key] = document
    with services(tmp_path) as processes:
        async with dispatcher(nats_server.url) as client:
            for key, document in documents.items():
                started = await client.start_run(yaml.safe_dump(document))
                assert started["run"] == key and started["output_uri"] == str(out / key)
            assert [status["run"] for status in await client.list_runs()] == [first, second]
            with pytest.raises(DispatcherError) as bare:
                await client.get_status("twin")
            assert bare.value.code == "NOT_FOUND" and f"{first}, {second}" in bare.value.details
            a = await until(lambda: all_queued(client, first), 60, what="team-a's prompts queued")
            b = await until(lambda: all_queued(client, second), 60, what="team-b's prompts queued")
            assert a["prompts"] < b["prompts"]  # the two limits, each in its own run
            assert queue.stream_name(first) != queue.stream_name(second)
            assert await stream_messages(nats_server.url, first) == a["prompts"]
            assert await stream_messages(nats_server.url, second) == b["prompts"]
            assert await stream_messages(nats_server.url, "twin") is None  # no stream for the bare name

            # team-a's worker drains team-a only: team-b's prompts wait for a worker of their own.
            processes.worker(nats_server.url, out, first, model_server, "a")
            done = await final_status(client, first, timeout=180)
            assert (done["phase"], done["generated"]) == ("Succeeded", a["prompts"]), done
            waiting = await client.get_status(second)
            assert (waiting["phase"], waiting["generated"]) == ("Generating", 0)
            assert waiting["queued"] == b["prompts"]
            processes.worker(nats_server.url, out, second, model_server, "b")
            other = await final_status(client, second, timeout=180)
            assert (other["phase"], other["generated"]) == ("Succeeded", b["prompts"]), other

    for key, rows in ((first, a["prompts"]), (second, b["prompts"])):
        store = RunStore.open(str(out), key)
        assert Path(store.root) == out / key
        saved = yaml.safe_load(store.read_text("spec.yaml") or "")
        assert (saved["metadata"]["name"], saved["metadata"]["namespace"]) == ("twin", key.split("/")[0])
        dataset = read_dataset(store)
        assert dataset is not None and dataset.num_rows == rows
    assert not (out / "twin").exists()


async def test_a_cancelled_run_keeps_its_data_and_starts_afresh_with_another_spec(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    key = "team-a/redo"
    document = in_namespace(spec("redo", tmp_path, limit=3), "team-a")
    async with dispatcher(nats_server.url) as client:
        await client.start_run(yaml.safe_dump(document))
        first = await until(lambda: all_queued(client, key), 60, what="prompts queued")
        # An operator that restarts registers the run again: the same spec is the same run.
        again = await client.start_run(yaml.safe_dump(document))
        assert again["started_at"] == first["started_at"] and again["published"] == first["prompts"]
        store = RunStore.open(str(tmp_path), key)
        assert Path(store.root) == tmp_path / "team-a" / "redo"
        manifest = store.ids_in(PROMPTS)
        assert len(manifest) == first["prompts"]

        cancelled = await client.cancel(key)
        assert cancelled["phase"] == "Cancelled"
        assert await stream_messages(nats_server.url, key) is None
        assert store.ids_in(PROMPTS) == manifest and store.read_text("spec.yaml")  # data stays

        # Another spec under the key, once the first is over: a fresh run with the new settings.
        changed = copy.deepcopy(document)
        changed["spec"]["prompts"]["limit"] = 6
        changed["spec"]["generation"]["maxNewTokens"] = 7
        fresh = await client.start_run(yaml.safe_dump(changed))
        assert fresh["run"] == key and fresh["started_at"] > cancelled["started_at"]
        queued_again = await until(lambda: all_queued(client, key), 60, what="the new spec's prompts queued")
        assert queued_again["prompts"] > first["prompts"]
        saved = yaml.safe_load(store.read_text("spec.yaml") or "")
        assert saved["spec"]["generation"]["maxNewTokens"] == 7
        assert [status["run"] for status in await client.list_runs()] == [key]
        await client.cancel(key)


async def test_unreachable_endpoint_and_unknown_model_fail_the_run_with_recorded_reasons(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    dead = f"http://127.0.0.1:{free_port()}"
    unreachable = spec("unreachable", out, limit=2, maxAttempts=1, timeoutSeconds=2)
    unknown = spec("wrongmodel", out, limit=2, engine="vllm", model="no-such-model")
    with FakeServer(Behaviour(latency=0.0, check_model=True)) as vllm, services(tmp_path) as processes:
        async with dispatcher(nats_server.url) as client:
            for document in (unreachable, unknown):
                await client.start_run(yaml.safe_dump(document))
            processes.worker(nats_server.url, out, "unreachable", dead, "w1")
            processes.worker(nats_server.url, out, "wrongmodel", vllm.url, "w2")
            lost, refused = await asyncio.gather(
                final_status(client, "unreachable", timeout=120),
                final_status(client, "wrongmodel", timeout=120),
            )
    for status, kind, words in (
        (lost, "connection", "Cannot connect"),
        (refused, "not_found", "does not exist"),
    ):
        assert status["prompts"] == 2
        assert (status["phase"], status["generated"], status["failed"]) == ("Failed", 0, 2)
        assert status["errors"] == {kind: 2}
        assert f"all 2 prompts failed: {kind} x2" in status["message"] and words in status["message"]
        table = RunStore.open(str(out), status["run"]).read_folder(FAILED_TABLE)
        assert table is not None and table.column("error_kind").to_pylist() == [kind, kind]
    assert vllm.behaviour.requests["chat"] == 2  # a refused model name is not retried


def _shard_with_unique_ids(store: RunStore) -> tuple[str, set[str]]:
    """A generation shard whose prompt ids appear in no other shard."""
    shards = {}
    for path in store.list_parquet(GENERATIONS):
        with store.fs.open(path, "rb") as handle:
            shards[path] = set(pq.read_table(handle, columns=["prompt_id"]).column("prompt_id").to_pylist())
    for path, ids in shards.items():
        others = set().union(*(other for key, other in shards.items() if key != path))
        if ids - others:
            return path, ids - others
    raise AssertionError("every shard's ids are duplicated elsewhere")


def test_restarts_and_faults_still_give_exactly_once_and_resubmits_send_nothing_twice(
    tmp_path: Path, model_server: str
) -> None:
    out = tmp_path / "out"
    run = "chaos"
    document = spec(run, out, maxNewTokens=4, concurrency=2, shardSize=2, timeoutSeconds=5, maxAttempts=8)
    document["spec"]["prompts"]["maxSeedChars"] = 100  # short prompts: the CPU model answers fast
    spec_file = write_spec(tmp_path / "run.yaml", document)
    text = spec_file.read_text()
    store = RunStore.open(str(out), run)
    server = EmbeddedNats(store_dir=str(tmp_path / "js")).start()
    faults = Faults(fail_every=4, hang_every=11, hang_seconds=6)  # hangs outlast the 5 s timeout

    async def queue_up(target: str) -> None:
        async with DispatcherClient(target) as client:
            await client.start_run(text)
            await until(lambda: queued(client, run, 10), 60, what="10 prompts queued")

    async def watch(target: str, submit: bool = False) -> dict[str, Any]:
        async with DispatcherClient(target) as client:
            if submit:
                await client.start_run(text)
            return await final_status(client, run, timeout=180)

    try:
        with services(tmp_path) as processes, FaultyProxy(model_server, faults) as proxy:
            # 1. A dispatcher queues the run and dies; the queue outlives it.
            first = processes.dispatcher(server.url)
            asyncio.run(queue_up(first.target))
            first.kill()

            # 2. A worker drains while a new dispatcher takes the run up from the registry; the
            #    worker is killed mid-batch, nats-server restarts, another worker finishes.
            doomed = processes.worker(server.url, out, run, proxy.url, "doomed")
            second = processes.dispatcher(server.url, first.port)
            deadline = time.monotonic() + 90
            while not store.list_parquet(GENERATIONS):
                assert time.monotonic() < deadline and doomed.process.poll() is None, doomed.output()
                time.sleep(0.05)
            doomed.kill()
            server.stop()
            server.start()
            survivor = processes.worker(server.url, out, run, proxy.url, "survivor")
            status = asyncio.run(watch(second.target))
            assert (status["phase"], status["generated"], status["failed"]) == ("Succeeded", 10, 0), status
            dataset = read_dataset(store)
            assert dataset is not None
            ids = dataset.column("prompt_id").to_pylist()
            assert len(ids) == len(set(ids)) == 10 and set(ids) == store.ids_in(PROMPTS)
            assert set(dataset.column("worker").to_pylist()) == {"doomed", "survivor"}
            assert faults.requests > faults.forwarded >= 10  # faults happened and were survived

            # 3. Submitting the same spec again sends nothing to the model.
            faults.fail_every = faults.hang_every = 0
            before = faults.requests
            submitted = subprocess.run(
                [*COSMO, "submit", str(spec_file), "--dispatcher", second.target, "--watch"],
                capture_output=True, text=True, timeout=180, env=os.environ.copy(), check=False,
            )  # fmt: skip
            assert submitted.returncode == 0, submitted.stderr
            assert "Succeeded 10/10 generated" in submitted.stdout.splitlines()[-1]
            assert faults.requests == before
            again = asyncio.run(watch(second.target))
            assert (again["already_done"], again["published"]) == (10, 0)

            # 4. Completions lost from storage are generated again, and only those.
            path, lost = _shard_with_unique_ids(store)
            manifest = store.read_folder(PROMPTS)
            assert manifest is not None
            lost_prompts = sorted(row["prompt"] for row in manifest.to_pylist() if row["prompt_id"] in lost)
            store.fs.rm(path)
            sent_before = len(faults.prompts)
            resumed = asyncio.run(watch(second.target, submit=True))
            assert (resumed["phase"], resumed["generated"]) == ("Succeeded", 10)
            assert (resumed["already_done"], resumed["published"]) == (10 - len(lost), len(lost))
            resent = sorted(
                json.loads(body)["messages"][0]["content"] for body in faults.prompts[sent_before:]
            )
            assert resent == lost_prompts

            assert survivor.terminate() == 0
            assert second.terminate() == 0
    finally:
        server.close()
