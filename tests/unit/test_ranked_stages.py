"""Data stages spread over pods: compaction as a Job, dedup and tokenization as datatrove ranks.

With `postprocess.ranks` > 1 the operator renders dedup's MinHash steps and tokenization as
Indexed Jobs (a pod per completion index, each a datatrove rank), one Job per step because each
step needs every rank of the one before; the chain of Jobs runs in order through the same
`next_step` as every other stage. Every Job's arguments are accepted by the real command line.
"""

from __future__ import annotations

from typing import Any

import pytest

from conftest import small_run
from cosmoforge.cli.main import build_parser
from cosmoforge.operator.progress import JobState, failure_line, next_step
from cosmoforge.operator.render import Platform, stage_jobs, stages
from cosmoforge.spec.model import GenerationRun, Phase, parse_run

PLATFORM = Platform(output_base="s3://datasets/runs")


def ranked_run(ranks: int, buckets: int = 14) -> GenerationRun:
    document = small_run("ranked")
    document["metadata"]["namespace"] = "gen"
    document["spec"]["postprocess"] = {
        "ranks": ranks,
        "dedup": {"buckets": buckets},
        "decontaminate": {"enabled": False},
    }
    document["spec"]["training"] = {"preset": "tiny", "evaluate": False}
    return parse_run(document)


def job_of(run: GenerationRun, name: str) -> dict[str, Any]:
    (stage,) = [s for s in stages(run, PLATFORM) if s.name == name]
    (job,) = stage_jobs(run, PLATFORM, stage)
    return job


def test_compaction_is_the_first_job_and_reads_the_run_root() -> None:
    run = ranked_run(1)
    first = stages(run, PLATFORM)[0]
    assert (first.name, first.phase) == ("compact", Phase.compacting)
    root = first.args[1]
    assert first.args == ("compact", root) and first.output == f"{root}/dataset"
    assert stages(run, PLATFORM)[1].args[1] == f"{root}/dataset"  # dedup reads what it wrote


def test_one_rank_keeps_one_job_per_stage() -> None:
    names = [s.name for s in stages(ranked_run(1), PLATFORM)]
    assert names == ["compact", "dedup", "tokenize", "train"]
    assert "completionMode" not in job_of(ranked_run(1), "dedup")["spec"]


@pytest.mark.parametrize("ranks", [2, 5])
def test_ranks_render_a_chain_of_indexed_jobs(ranks: int) -> None:
    run = ranked_run(ranks, buckets=7)
    planned = stages(run, PLATFORM)
    names = [s.name for s in planned]
    assert names == [
        "compact",
        "dedup-signatures",
        "dedup-buckets",
        "dedup-cluster",
        "dedup-filter",
        "dedup",  # the last step carries the stage's name: its end is the stage's end
        "tokenize-ranks",
        "tokenize",
        "train",
    ]
    parser = build_parser()
    for stage in planned:
        args = parser.parse_args(list(stage.args))  # the real command line accepts every Job's args
        if stage.ranks > 1:
            assert args.world_size == stage.ranks
            spec = job_of(run, stage.name)["spec"]
            assert spec["completionMode"] == "Indexed"
            assert spec["completions"] == spec["parallelism"] == stage.ranks
            assert "--rank" not in stage.args  # each pod's rank is its JOB_COMPLETION_INDEX
    merge = parser.parse_args(list(planned[names.index("tokenize")].args))
    assert (merge.step, merge.world_size) == ("merge", ranks)  # one pod gathering every rank
    world = {s.name: s.ranks for s in planned}
    assert world["dedup-signatures"] == world["dedup-filter"] == world["tokenize-ranks"] == ranks
    assert world["dedup-cluster"] == world["dedup"] == world["tokenize"] == 1
    assert {s.output for s in planned if s.kind == "dedup"} == {planned[1].args[3]}


def test_the_steps_run_one_after_another_and_a_failed_rank_fails_the_stage() -> None:
    planned = stages(ranked_run(3), PLATFORM)
    jobs: dict[str, JobState] = {}
    started = []
    for _ in planned:
        step = next_step(planned, jobs, generation_done=True, finished=[])
        assert step.start is not None
        started.append(step.start.name)
        jobs[step.start.name] = JobState.running
        assert next_step(planned, jobs, True, []).start is None  # nothing else while it runs
        jobs[step.start.name] = JobState.succeeded
    assert started == [s.name for s in planned]
    assert next_step(planned, jobs, True, []).phase == Phase.succeeded
    jobs["dedup-filter"] = JobState.failed
    failed = next_step(planned, jobs, True, [])
    assert failed.phase == Phase.failed and failed.failed is not None and failed.failed.name == "dedup-filter"


def test_a_failed_stage_is_explained_by_its_pods_last_line() -> None:
    def pod(finished: str, code: int, message: str) -> dict[str, Any]:
        terminated = {"exitCode": code, "finishedAt": finished, "message": message}
        return {"status": {"containerStatuses": [{"name": "c", "state": {"terminated": terminated}}]}}

    pods = [
        pod("2026-01-01T00:00:01Z", 1, "Traceback ...\nOSError: connection reset\n"),
        pod("2026-01-01T00:00:05Z", 2, "reading\ncosmo dedup: s3://k:secret@b/r/x.parquet: not parquet\n"),
        pod("2026-01-01T00:00:09Z", 0, "done\n"),  # a rank that succeeded explains nothing
    ]
    line = failure_line(pods)
    assert line is not None and line.endswith("x.parquet: not parquet") and "secret" not in line
    assert failure_line([pod("2026-01-01T00:00:01Z", 1, "")]) is None
    assert failure_line([]) is None


@pytest.mark.parametrize(
    "argv",
    [
        ["dedup", "in", "--out", "out", "--step", "signatures"],
        ["tokenize", "in", "--out", "out", "--step", "tokenize"],
    ],
)
def test_a_rank_is_the_pods_completion_index_and_a_bad_index_is_a_clear_error(
    argv: list[str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from cosmoforge.cli.main import main
    from cosmoforge.cli.options import job_rank

    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    assert job_rank(None) == 3 and job_rank(0) == 0
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "three")
    assert main(argv) == 2  # a usage error, as argparse exits with
    assert "JOB_COMPLETION_INDEX='three' is not a rank: pass --rank" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--rank", "-1"])
