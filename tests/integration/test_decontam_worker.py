"""Decontamination as workers of a run: tasks over NATS, real processes, the one-process answer.

Everything here is real: parquet shards on disk, the benchmark files the other decontamination
tests use, nats-server with JetStream file storage, `cosmo decontaminate-worker` processes
killed with SIGKILL while they hold a task (or killing themselves on one range every time), and
nats-server restarted under a worker. The reference for every merged output is
`cosmo decontaminate` (`decontaminate_dataset`) on the same input in one process: same kept and
removed rows, same report.json bytes, same report.md. On a real S3 server (moto), the waiting
submitter's look at the partials may meet the finalizer removing them, and a file written after a
process listed its folder is still read.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cosmoforge.postprocess import decontam, evalsets
from cosmoforge.postprocess.decontam import plan as plans
from cosmoforge.postprocess.decontam import submit as submission
from cosmoforge.postprocess.decontam import tasks
from cosmoforge.postprocess.decontam import worker as task_worker
from cosmoforge.postprocess.decontam.plan import Plan, Settings
from cosmoforge.postprocess.stages import decontaminate_dataset
from cosmoforge.queue import EmbeddedNats, topology
from cosmoforge.storage import RunStore
from processes import COSMO

DATA = Path(__file__).parents[1] / "data" / "benchmarks"
BENCHMARKS = tuple(
    str(DATA / name) for name in ("arc_easy.jsonl", "boolq.jsonl", "mmlu.jsonl", "piqa.jsonl", "custom.jsonl")
)
SETTINGS = Settings(BENCHMARKS, decontam.Config())
WORDS = (
    "river garden winter planet engine story market teacher window signal forest number careful "
    "bright quiet gentle ancient modern simple heavy rapid silver copper paper stone cloud field "
    "music lesson chapter history science energy water light sound travel season harbor valley"
).split()


def _document(rng: random.Random, items: list[str], words: int) -> str:
    """Filler words with, now and then, a benchmark item planted whole, in part, or shouted."""
    text = " ".join(rng.choice(WORDS) for _ in range(words))
    roll = rng.random()
    if roll < 0.06:
        return text + " " + rng.choice(items) + " " + text
    if roll < 0.11:  # the first 12 words of a long item: a candidate at or under the threshold
        item = rng.choice([item for item in items if len(item.split()) >= 25]).split()
        return text + " " + " ".join(item[:12]) + " " + text
    if roll < 0.12:
        return rng.choice(items).upper()
    if roll < 0.14:
        return rng.choice(["", "   \n "])
    return text


def write_dataset(folder: Path, files: int, rows: int, words: int = 60, seed: int = 0) -> list[str]:
    """`dataset/data-*.parquet` as compaction writes them; one file in many small row groups."""
    rng = random.Random(seed)
    items = [item.text for item in evalsets.load_benchmarks(list(BENCHMARKS))]
    folder.mkdir(parents=True, exist_ok=True)
    ids = []
    for number in range(files):
        batch = [f"doc-{number}-{row:05d}" for row in range(rows)]
        ids += batch
        table = pa.table(
            {
                "prompt_id": batch,
                "text": [_document(rng, items, words) for _ in batch],
                "seed_source": [rng.choice(["web", "stories", None, ""]) for _ in batch],
                "completion_tokens": [rng.randrange(100) for _ in batch],
            }
        )
        path = folder / f"data-{number:05d}-of-{files:05d}.parquet"
        pq.write_table(table, path, row_group_size=37 if number == 1 else None)
    return ids


def one_process(source: Path, out: Path, group_field: str | None = None) -> dict[str, Any]:
    return decontaminate_dataset(
        str(source), str(out), list(BENCHMARKS), decontam.Config(), group_field=group_field, workers=1
    )


def assert_same_outputs(distributed: Path, reference: Path, ids: list[str]) -> None:
    """The merged outputs are the one-process outputs, and every document is in exactly one."""
    for name in ("report.json", "report.md"):
        assert (distributed / name).read_bytes() == (reference / name).read_bytes(), name
    for name in ("kept.parquet", "removed.parquet"):
        merged, expected = pq.read_table(distributed / name), pq.read_table(reference / name)
        assert merged.equals(expected, check_metadata=False), name
    kept = pq.read_table(distributed / "kept.parquet").column("prompt_id").to_pylist()
    removed = pq.read_table(distributed / "removed.parquet").column("prompt_id").to_pylist()
    assert sorted(kept + removed) == sorted(ids) and len(set(kept + removed)) == len(ids)
    assert not list((distributed / "tasks").glob("*/*")), "partials are removed once merged"


def run_tasks_here(plan: Plan, order: list[int]) -> None:
    with decontam.Checker(tasks.build_index(plan.settings), workers=1) as checker:
        for number in order:
            tasks.run_task(plan, plan.tasks[number], checker)


# --- on S3, while other processes write and remove the plan's files ------------------------------


def test_listing_partials_while_the_finalizer_removes_them_is_no_error(
    tmp_path: Path, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_dataset(tmp_path / "dataset", files=1, rows=40)
    out = f"s3://{s3_bucket}/run/decontam"
    plan = plans.store_plan(plans.make_plan(str(tmp_path / "dataset"), out, SETTINGS, rows_per_task=20))
    run_tasks_here(plan, [0, 1])
    assert plans.finished_tasks(plan) == {"t000000", "t000001"}

    fs = plans.out_store(out).fs  # the process's one S3 filesystem, shared by every store
    listing = fs.ls
    finalized: list[dict[str, Any]] = []

    def finalized_first(path: str, *args: Any, **kwargs: Any) -> Any:
        # The worker finalizes between the waiter's look at the folder and its listing.
        if path.rstrip("/").endswith(plan.nonce) and not finalized:
            monkeypatch.setattr(fs, "ls", listing)
            finalized.append(tasks.finalize(plan))
        return listing(path, *args, **kwargs)

    monkeypatch.setattr(fs, "ls", finalized_first)
    assert plans.finished_tasks(plan) == set()
    assert finalized and plans.is_done(plan)
    assert plans.task_errors(plan) == {}
    assert tasks.read_report(plan) == finalized[0]


def test_a_file_written_after_this_process_listed_its_folder_is_read(s3_bucket: str) -> None:
    store = RunStore.open(f"s3://{s3_bucket}/runs", "ns/run")
    store.write_text("decontam/tasks/plan.json", "{}")
    assert store.fs.ls(store.path("decontam/tasks"), detail=False)  # the listing is now cached
    boto3.client("s3").put_object(Bucket=s3_bucket, Key="runs/ns/run/decontam/tasks/done.json", Body=b"{}")
    assert store.read_text("decontam/tasks/done.json") == "{}"
    assert store.read_text("decontam/tasks/missing.json") is None


# --- without a queue: plan, partials, merge ------------------------------------------------------


@pytest.mark.parametrize("grouped", [True, False])
def test_partials_in_any_order_merge_into_the_one_process_outputs(tmp_path: Path, grouped: bool) -> None:
    ids = write_dataset(tmp_path / "dataset", files=3, rows=400)
    if not grouped:
        for path in (tmp_path / "dataset").glob("*.parquet"):
            pq.write_table(pq.read_table(path).drop_columns(["seed_source"]), path)
    reference = one_process(tmp_path / "dataset", tmp_path / "reference")
    assert reference["documents_removed"] > 20 and reference["near_miss_count"] > 5
    assert (reference["groups"] != []) == grouped

    plan = plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), SETTINGS, rows_per_task=150)
    assert [(t.start, t.stop) for t in plan.tasks[:3]] == [(0, 150), (150, 300), (300, 400)]
    assert len(plan.tasks) == 9 and plan.documents == 1200
    plan = plans.store_plan(plan)
    order = list(range(len(plan.tasks)))
    random.Random(1).shuffle(order)
    run_tasks_here(plan, order)
    run_tasks_here(plan, order[:2])  # redelivered tasks rewrite their partials: no duplicates
    assert plans.finished_tasks(plan) == {task.id for task in plan.tasks}
    report = tasks.finalize(plan)
    assert report == reference
    assert plans.is_done(plan)
    assert_same_outputs(tmp_path / "out", tmp_path / "reference", ids)


def test_near_misses_past_the_limit_are_the_best_ones_of_the_whole_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cosmoforge.postprocess.decontam import report

    monkeypatch.setattr(report, "NEAR_MISS_LIMIT", 7)  # each partial keeps its best 7, as the report
    ids = write_dataset(tmp_path / "dataset", files=2, rows=300, seed=3)
    reference = one_process(tmp_path / "dataset", tmp_path / "reference")
    assert reference["near_miss_count"] > 7 and len(reference["near_misses"]) == 7
    plan = plans.store_plan(
        plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), SETTINGS, rows_per_task=50)
    )
    run_tasks_here(plan, list(range(len(plan.tasks))))
    assert tasks.finalize(plan) == reference
    assert_same_outputs(tmp_path / "out", tmp_path / "reference", ids)


def test_plan_checks_columns_and_is_reused_for_the_same_work(tmp_path: Path) -> None:
    write_dataset(tmp_path / "dataset", files=2, rows=10)
    with pytest.raises(evalsets.InputError, match="no column 'body'"):
        plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), SETTINGS, "body")
    with pytest.raises(evalsets.InputError, match="no column 'topic' for --group-field"):
        plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), SETTINGS, group_field="topic")
    with pytest.raises(evalsets.InputError, match="no such file"):
        plans.make_plan(str(tmp_path / "missing"), str(tmp_path / "out"), SETTINGS)
    first = plans.store_plan(plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), SETTINGS))
    again = plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), SETTINGS)
    assert again.nonce != first.nonce and plans.store_plan(again).nonce == first.nonce
    recut = plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), SETTINGS, rows_per_task=3)
    assert plans.store_plan(recut) == first  # a plan in progress keeps its own cut
    assert plans.store_plan(recut, replace=True) == recut == plans.load_plan(recut.out)
    first = plans.store_plan(first, replace=True)
    other = Settings(BENCHMARKS, decontam.Config(threshold=0.7))
    changed = plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), other)
    assert plans.store_plan(changed).nonce == changed.nonce != first.nonce


def test_jsonl_and_single_file_inputs_merge_into_the_one_process_outputs(tmp_path: Path) -> None:
    ids = write_dataset(tmp_path / "dataset", files=2, rows=120, seed=9)
    table = pq.read_table(tmp_path / "dataset" / "data-00001-of-00002.parquet")
    lines = [json.dumps(row) + "\n" for row in table.to_pylist()]
    (tmp_path / "dataset" / "data-00001-of-00002.parquet").unlink()
    (tmp_path / "dataset" / "data-00001-of-00002.jsonl").write_text("".join(lines))
    for source, name in (
        (tmp_path / "dataset", "folder"),
        (tmp_path / "dataset" / "data-00001-of-00002.jsonl", "file"),
    ):
        one_process(source, tmp_path / f"reference-{name}")
        plan = plans.store_plan(
            plans.make_plan(str(source), str(tmp_path / f"out-{name}"), SETTINGS, rows_per_task=50)
        )
        assert {task.format for task in plan.tasks} == (
            {"parquet", "jsonl"} if name == "folder" else {"jsonl"}
        )
        run_tasks_here(plan, list(reversed(range(len(plan.tasks)))))
        tasks.finalize(plan)
        wanted = ids if name == "folder" else ids[120:]
        assert_same_outputs(tmp_path / f"out-{name}", tmp_path / f"reference-{name}", wanted)


# --- over NATS, with real worker processes ---------------------------------------------------------


def worker_process(
    folder: Path, nats_url: str, run: str, name: str, *extra: str
) -> tuple[subprocess.Popen[bytes], Path]:
    log = folder / f"{name}.log"
    command = [*COSMO, "decontaminate-worker", "--nats", nats_url, "--run", run, "--worker-id", name, *extra]
    with log.open("wb") as sink:
        return subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT), log


def holds_unfinished_task(log: Path) -> str | None:
    """The task a (stopped) worker is checking after finishing at least one, from its own log."""
    text = log.read_text()
    started = re.findall(r"task (t\d+): rows", text)
    if len(started) < 2 or f"task {started[-1]} done" in text:
        return None
    return started[-1]


def stop(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM, as Kubernetes stops a pod; its checking processes must end with it."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def processes_mentioning(text: str, timeout: float = 30.0) -> list[int]:
    """Live processes whose command line holds `text`, once none is left or `timeout` passed."""
    deadline = time.monotonic() + timeout
    while True:
        found = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    command = (entry / "cmdline").read_bytes()
                    state = (entry / "stat").read_text().split()[2]
                except OSError:
                    continue
                if text.encode() in command and state != "Z":
                    found.append(int(entry.name))
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def submit(url: str, run: str, plan: Plan, ack_wait: float = 3.0) -> submission.Submitted:
    return asyncio.run(submission.submit(url, run, plan, ack_wait=ack_wait))


def test_a_worker_killed_mid_task_loses_nothing_and_duplicates_nothing(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    ids = write_dataset(tmp_path / "dataset", files=4, rows=1500, words=300)
    reference = one_process(tmp_path / "dataset", tmp_path / "reference")
    plan = plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), SETTINGS, rows_per_task=250)
    submitted = submit(nats_server.url, "chaos", plan)
    assert submitted.published == len(plan.tasks) == 24
    doomed, doomed_log = worker_process(tmp_path, nats_server.url, "chaos", "doomed", "--workers", "2")
    survivor: subprocess.Popen[bytes] | None = None
    try:
        # Freeze the doomed worker until its own log shows it inside a task (after finishing one:
        # its index and checking processes are up), then kill -9 it. No timing decides this.
        deadline = time.monotonic() + 120
        while True:
            assert doomed.poll() is None, doomed_log.read_text()
            assert time.monotonic() < deadline, "the doomed worker never held a task"
            assert not plans.is_done(plan), "every task finished before the kill"
            os.kill(doomed.pid, signal.SIGSTOP)
            held = holds_unfinished_task(doomed_log)
            if held:
                os.kill(doomed.pid, signal.SIGKILL)
                doomed.wait()
                break
            os.kill(doomed.pid, signal.SIGCONT)
            time.sleep(0.02)
        survivor, survivor_log = worker_process(
            tmp_path, nats_server.url, "chaos", "survivor", "--workers", "2"
        )
        report = submission.wait_done(plan, timeout=180)
    finally:
        stopped = stop(survivor) if survivor is not None else None
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait()
    assert stopped == 0, survivor_log.read_text()
    # Neither the killed worker's checking processes nor the stopped one's are left behind.
    assert processes_mentioning(nats_server.url) == []
    log = survivor_log.read_text()
    assert re.search(rf"task {held}: rows .* \(delivery [2-9]\)", log), log  # handed over after ack_wait
    assert "finalized" in log
    assert report == reference
    assert_same_outputs(tmp_path / "out", tmp_path / "reference", ids)


def test_nats_restart_under_a_worker_loses_nothing(tmp_path: Path) -> None:
    ids = write_dataset(tmp_path / "dataset", files=3, rows=600, words=200, seed=5)
    one_process(tmp_path / "dataset", tmp_path / "reference")
    plan = plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), SETTINGS, rows_per_task=100)
    server = EmbeddedNats(store_dir=str(tmp_path / "js")).start()
    worker, log = worker_process(tmp_path, server.url, "restart", "w", "--workers", "2")
    try:
        submit(server.url, "restart", plan)
        deadline = time.monotonic() + 120
        while not plans.finished_tasks(plan):
            assert worker.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        # Freeze the worker while the server goes away, so the outage lands in the middle of the work.
        os.kill(worker.pid, signal.SIGSTOP)
        assert not plans.is_done(plan)
        server.stop()  # file storage keeps the queued and the unacknowledged tasks
        os.kill(worker.pid, signal.SIGCONT)
        time.sleep(1.0)
        server.start()
        submission.wait_done(plan, timeout=180)
    finally:
        stopped = stop(worker)
        server.close()
    assert stopped == 0, log.read_text()
    assert "nats: reconnected" in log.read_text()
    assert_same_outputs(tmp_path / "out", tmp_path / "reference", ids)


def test_resubmitting_resumes_and_a_bad_task_fails_the_wait(
    tmp_path: Path, nats_server: EmbeddedNats
) -> None:
    write_dataset(tmp_path / "dataset", files=2, rows=50)
    plan = plans.store_plan(
        plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), SETTINGS, rows_per_task=20)
    )
    run_tasks_here(plan, [0, 1, 2])
    first = submit(nats_server.url, "resume", plan)
    assert (first.finished, first.published) == (3, len(plan.tasks) - 3)
    again = submit(nats_server.url, "resume", plan)  # nothing new: every other task is already queued
    assert (again.plan.nonce, again.queued, again.published) == (plan.nonce, len(plan.tasks) - 3, 0)

    # A text column that is not text in one file: the task fails for good, the wait says why.
    bad = tmp_path / "bad"
    write_dataset(bad, files=2, rows=30)
    table = pq.read_table(bad / "data-00001-of-00002.parquet")
    table = table.set_column(1, "text", pa.array(list(range(table.num_rows))))
    pq.write_table(table, bad / "data-00001-of-00002.parquet")
    bad_plan = plans.make_plan(str(bad), str(tmp_path / "bad-out"), SETTINGS)
    submitted = submit(nats_server.url, "bad", bad_plan)
    worker, _ = worker_process(tmp_path, nats_server.url, "bad", "w", "--workers", "1")
    try:
        with pytest.raises(submission.TaskFailed, match=r"task t000001 failed: .*not text"):
            submission.wait_done(submitted.plan, timeout=120)
    finally:
        stop(worker)
    assert not plans.is_done(submitted.plan)


def test_cli_submits_a_runs_decontamination_to_local_workers(tmp_path: Path) -> None:
    from conftest import small_run, write_spec
    from cosmoforge.spec.model import dump_run, parse_run

    document = small_run("decon")
    document["spec"]["postprocess"] = {
        "dedup": {"enabled": False},
        "decontaminate": {"benchmarks": list(BENCHMARKS)},
    }
    run_folder = tmp_path / "output" / "decon"
    ids = write_dataset(run_folder / "dataset", files=2, rows=300, seed=7)
    (run_folder / "spec.yaml").write_text(dump_run(parse_run(document)))
    write_spec(tmp_path / "run.yaml", document)
    one_process(run_folder / "dataset", tmp_path / "reference")

    command = [*COSMO, "decontaminate-submit", "--out", str(tmp_path / "output"), "--run", "decon"]
    result = subprocess.run(
        [*command, "--spawn", "2", "--rows-per-task", "100", "--timeout", "300"],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "600 documents" in result.stdout
    assert_same_outputs(run_folder / "decontam", tmp_path / "reference", ids)
    again = subprocess.run(
        [*command, "--spawn", "1"], capture_output=True, text=True, timeout=120, check=False
    )
    assert again.returncode == 0 and "already decontaminated" in again.stdout, again.stderr

    missing = subprocess.run(
        [*COSMO, "decontaminate-submit", "--out", str(tmp_path / "output"), "--run", "nope", "--spawn", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2
    assert missing.stderr.startswith("cosmo decontaminate-submit: error: no spec.yaml under")


async def test_heartbeats_keep_a_task_longer_than_ack_wait_with_its_worker(
    tmp_path: Path, nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_dataset(tmp_path / "dataset", files=1, rows=20)
    plan = plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), SETTINGS)
    checked = tasks.run_task

    def slow(plan: Plan, task: plans.Task, checker: decontam.Checker) -> dict[str, Any]:
        time.sleep(3.0)  # three times ack_wait: only heartbeats keep the task from the idle worker
        return checked(plan, task, checker)

    monkeypatch.setattr(task_worker, "run_task", slow)
    submitted = await submission.submit(nats_server.url, "slow", plan, ack_wait=1.0)
    workers = [
        task_worker.Worker(
            task_worker.WorkerConfig(nats_server.url, "slow", processes=1, worker_id=f"w{n}"), SETTINGS
        )
        for n in range(2)
    ]
    running = [asyncio.create_task(worker.run()) for worker in workers]
    try:
        await asyncio.to_thread(submission.wait_done, submitted.plan, 120)
    finally:
        for worker in workers:
            worker.stop()
        await asyncio.gather(*running)
        for worker in workers:
            worker.close()
    assert sorted(worker.tasks_done for worker in workers) == [0, 1]  # one delivery, one worker


# A worker that dies the way the kernel's OOM killer ends one: SIGKILL, no cleanup, no ack. It is
# the real `cosmo decontaminate-worker`, with `run_task` wrapped to kill its own process when it
# is handed the range named first on its command line.
KILLED_BY_ONE_RANGE = """
import os, signal, sys
from cosmoforge.cli.main import main
from cosmoforge.postprocess.decontam import worker as task_worker
doomed, checked = sys.argv[1], task_worker.run_task
def run_task(plan, task, checker):
    if task.id == doomed:
        os.kill(os.getpid(), signal.SIGKILL)
    return checked(plan, task, checker)
task_worker.run_task = run_task
sys.exit(main(sys.argv[2:]))
"""


def write_run(output: Path, run: str, files: int, rows: int) -> list[str]:
    """A run folder whose spec decontaminates its dataset/ (no dedup) against BENCHMARKS."""
    from conftest import small_run
    from cosmoforge.spec.model import dump_run, parse_run

    document = small_run(run)
    document["spec"]["postprocess"] = {
        "dedup": {"enabled": False},
        "decontaminate": {"benchmarks": list(BENCHMARKS)},
    }
    ids = write_dataset(output / run / "dataset", files=files, rows=rows, seed=11)
    (output / run / "spec.yaml").write_text(dump_run(parse_run(document)))
    return ids


async def _stream_state(url: str, run: str) -> int | None:
    """Messages in the run's task stream; None when there is no stream."""
    import nats
    from nats.js.errors import NotFoundError

    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(topology.decontam_stream_name(run))).state.messages
    except NotFoundError:
        return None
    finally:
        await nc.close()


async def _forget_advisories(url: str, run: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        stream = topology.decontam_stream_name(run)
        await nc.jetstream().purge_stream(stream, subject=topology.decontam_advisory_subject(run))
    finally:
        await nc.close()


def wait_for_line(log: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)


@pytest.mark.parametrize("replan", [False, True])
def test_a_range_that_kills_its_worker_fails_the_wait_and_a_resubmission_finishes(
    tmp_path: Path, nats_server: EmbeddedNats, replan: bool
) -> None:
    output, run = tmp_path / "output", "oom"
    ids = write_run(output, run, files=2, rows=60)
    one_process(output / run / "dataset", tmp_path / "reference")
    submit_command = [*COSMO, "decontaminate-submit", "--nats", nats_server.url, "--out", str(output)]
    submit_command += ["--run", run, "--wait", "--timeout", "240"]
    # Four ranges (0-40, 40-60 of each file); the first of the second file kills every worker.
    started = time.monotonic()
    submitter = subprocess.Popen(
        [*submit_command, "--rows-per-task", "40", "--ack-wait", "1", "--max-deliver", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    doomed_command = [sys.executable, "-c", KILLED_BY_ONE_RANGE, "t000002", "decontaminate-worker"]
    doomed_command += ["--nats", nats_server.url, "--run", run, "--workers", "1"]
    deaths: list[int] = []
    doomed_log = (tmp_path / "doomed.log").open("ab")
    worker = subprocess.Popen(doomed_command, stdout=doomed_log, stderr=subprocess.STDOUT)
    try:
        while submitter.poll() is None:  # a Job's pod: replaced whenever it dies
            assert time.monotonic() - started < 300, "the submitter never returned"
            if worker.poll() is not None:
                deaths.append(worker.returncode)
                worker = subprocess.Popen(doomed_command, stdout=doomed_log, stderr=subprocess.STDOUT)
            time.sleep(0.05)
        stdout, stderr = submitter.communicate()
        elapsed = time.monotonic() - started
    finally:
        if submitter.poll() is None:
            submitter.kill()
        stop(worker)
        doomed_log.close()
    assert submitter.returncode == 2, stderr.decode() + (tmp_path / "doomed.log").read_text()
    lines = stderr.decode().strip().splitlines()
    assert len(lines) == 1, stderr.decode()
    assert re.fullmatch(
        r"cosmo decontaminate-submit: error: task t000002 \(rows 0-40 of \S+/data-00001-of-00002\.parquet\) "
        r"was given up: its worker died \(or stopped answering\) on each of the 2 deliveries, .*",
        lines[-1],
    ), stderr.decode()
    assert elapsed < 120, elapsed  # JetStream's word, not the --timeout of 240 s
    assert deaths == [-signal.SIGKILL, -signal.SIGKILL]  # one per delivery, then no more
    assert b"4 queued now" in stdout

    # A submitter that starts waiting after JetStream gave up still finds out: from the advisory
    # the stream keeps, and without it, from the consumer's state.
    plan = plans.load_plan(str(output / run / "decontam"))
    assert plan is not None
    for forget in (False, True):
        if forget:
            asyncio.run(_forget_advisories(nats_server.url, run))
        with pytest.raises(submission.TaskGivenUp, match=r"^task t000002 \(rows 0-40 of .* 2 deliveries"):
            submission.wait_done(plan, timeout=60, nats_url=nats_server.url, run=run)
    assert asyncio.run(_stream_state(nats_server.url, run)) == 1  # the stranded range, still there

    # Fixed (here: no more fault), a resubmission queues that range again and finishes; with
    # --replan, a new plan cut smaller, past the old plan's stranded message.
    healthy, healthy_log = worker_process(tmp_path, nats_server.url, run, "healthy", "--workers", "1")
    try:
        again = subprocess.run(
            [*submit_command, *(["--replan", "--rows-per-task", "20"] if replan else [])],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert again.returncode == 0, again.stderr
        queued = (
            "6 queued now, 0 already queued, 0"
            if replan
            else "1 queued now (1 given up before), 0 already queued, 3"
        )
        assert f"{queued} already done" in again.stdout
        assert_same_outputs(output / run / "decontam", tmp_path / "reference", ids)
        assert asyncio.run(_stream_state(nats_server.url, run)) is None  # the stage's stream is removed
        # The worker that was waiting on it says so and waits for another, until stopped.
        wait_for_line(healthy_log, "consumer of COSMO_OOM_DECONTAM is gone", healthy)
        wait_for_line(healthy_log, "waiting for the decontaminators consumer", healthy)
    finally:
        stopped = stop(healthy)
    log = healthy_log.read_text()
    assert stopped == 0 and "Traceback" not in log and "fetch failed" not in log, log
    assert processes_mentioning(nats_server.url) == []


async def test_an_idle_worker_leaves_cleanly_when_its_stage_stream_is_removed(
    nats_server: EmbeddedNats, caplog: pytest.LogCaptureFixture
) -> None:
    import nats

    caplog.set_level("INFO", logger="cosmoforge")
    nc = await nats.connect(nats_server.url)
    try:
        await topology.ensure_decontam_queue(nc.jetstream(), "leave", ack_wait=1.0)
        worker = task_worker.Worker(
            task_worker.WorkerConfig(nats_server.url, "leave", processes=1, idle_exit=2.0)
        )
        running = asyncio.create_task(worker.run())
        deadline = time.monotonic() + 30
        while "bound to the decontaminators consumer" not in caplog.text:
            assert time.monotonic() < deadline and not running.done()
            await asyncio.sleep(0.02)
        await tasks.remove_stream(nc.jetstream(), "leave")
        await asyncio.wait_for(running, 30)  # it waits for another consumer, then idles out
    finally:
        await nc.close()
    assert "consumer of COSMO_LEAVE_DECONTAM is gone" in caplog.text
    assert "idle for 2s: exiting" in caplog.text
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_range_failing_on_every_delivery_fails_the_wait_with_its_error(
    tmp_path: Path, nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_dataset(tmp_path / "dataset", files=1, rows=20)
    plan = plans.make_plan(str(tmp_path / "dataset"), str(tmp_path / "out"), SETTINGS)

    def failing(plan: Plan, task: plans.Task, checker: decontam.Checker) -> dict[str, Any]:
        raise OSError("no space left on device")  # storage trouble: worth another delivery, not more

    monkeypatch.setattr(task_worker, "run_task", failing)
    submitted = await submission.submit(nats_server.url, "full", plan, ack_wait=1.0, max_deliver=2)
    worker = task_worker.Worker(task_worker.WorkerConfig(nats_server.url, "full", processes=1), SETTINGS)
    running = asyncio.create_task(worker.run())
    try:
        with pytest.raises(
            submission.TaskFailed,
            match=r"^task t000000 failed: no space left on device \(on delivery 2, the last\)$",
        ):
            await asyncio.to_thread(
                submission.wait_done, submitted.plan, 60, nats_url=nats_server.url, run="full"
            )
    finally:
        worker.stop()
        await running
        worker.close()


def test_a_worker_waits_for_nats_and_stops_on_sigterm_before_it_answers(tmp_path: Path) -> None:
    # A pod can start before NATS does: the worker says where it connects, keeps trying, and a
    # SIGTERM in the meantime (a rollout, a drained node) ends it cleanly.
    log = tmp_path / "worker.log"
    with log.open("wb") as handle:
        worker = subprocess.Popen(
            [*COSMO, "decontaminate-worker", "--nats", "nats://127.0.0.1:9", "--run", "later"],
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + 60
            while "Connect call failed" not in log.read_text() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert "connecting to NATS at nats://127.0.0.1:9" in log.read_text()
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=30) == 0
        finally:
            if worker.poll() is None:
                worker.kill()
    assert "Traceback" not in log.read_text()
