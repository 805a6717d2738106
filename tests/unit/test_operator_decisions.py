"""The operator's decisions, without a cluster: replicas from queue depth, the next stage, status.

Pure functions (`autoscale.decide`, `progress.next_step`, `progress.counts_from`) that the
reconcile loop calls between observing and acting; tables of situations cover them here.
"""

from __future__ import annotations

from typing import Any

from conftest import EXAMPLES
from cosmoforge import queue
from cosmoforge.operator.autoscale import decide, desired_replicas
from cosmoforge.operator.progress import (
    Counts,
    JobState,
    QueueState,
    counts_from,
    job_state,
    next_step,
    progress_text,
    set_condition,
)
from cosmoforge.operator.reconcile import CONFLICT, conflict_message, conflict_resolved
from cosmoforge.operator.render import Platform, stages
from cosmoforge.queue import topology
from cosmoforge.spec.model import Phase, load_run

PLATFORM = Platform(output_base="s3://datasets/runs")


# --- autoscaling -----------------------------------------------------------------------------


def test_desired_replicas_is_clamped_ceil_of_depth_over_target() -> None:
    assert desired_replicas(0, 100, 0, 8) == 0
    assert desired_replicas(1, 100, 0, 8) == 1
    assert desired_replicas(100, 100, 0, 8) == 1
    assert desired_replicas(101, 100, 0, 8) == 2
    assert desired_replicas(10_000, 100, 0, 8) == 8
    assert desired_replicas(0, 100, 2, 8) == 2


def _decide(current: int, depth: int | None, now: float, history: Any = (), **kw: Any) -> Any:
    options = {
        "done": False,
        "suspended": False,
        "target_per_replica": 100,
        "minimum": 1,
        "maximum": 8,
        "window": 60.0,
    }
    return decide(current=current, depth=depth, now=now, history=history, **{**options, **kw})


def test_scale_up_is_immediate_and_scale_down_waits_for_the_window() -> None:
    up = _decide(1, 750, now=0.0)
    assert up.replicas == 8
    down = _decide(8, 150, now=10.0, history=up.history)
    assert down.replicas == 8 and down.reason == "stabilizing"
    later = _decide(8, 150, now=80.0, history=down.history)
    assert later.replicas == 2


def test_oscillating_depth_does_not_flap() -> None:
    history: Any = ()
    current = 1
    changes = []
    for second in range(0, 120, 5):
        depth = 500 if (second // 5) % 2 == 0 else 50
        decision = _decide(current, depth, now=float(second), history=history)
        if decision.replicas != current:
            changes.append((second, decision.replicas))
        current, history = decision.replicas, decision.history
        assert 1 <= current <= 8
    assert changes == [(0, 5)]


def test_zero_when_done_or_suspended_and_unchanged_when_blind() -> None:
    assert _decide(4, 0, now=0.0, done=True).replicas == 0
    assert _decide(4, 300, now=0.0, suspended=True).replicas == 0
    assert _decide(4, None, now=0.0).replicas == 4
    assert _decide(0, 10, now=0.0, minimum=0).replicas == 1


def test_a_restarted_autoscaler_does_not_scale_down_early() -> None:
    assert _decide(6, 0, now=1000.0, history=()).replicas == 6


# --- progress --------------------------------------------------------------------------------


def test_stages_advance_one_at_a_time() -> None:
    run = load_run(EXAMPLES / "cosmopedia-mixtral.yaml")
    planned = stages(run, PLATFORM)
    compact, dedup, decontam = planned[:3]
    assert next_step(planned, {}, False, []).phase == Phase.generating
    first = next_step(planned, {}, True, [])
    assert first.phase == Phase.compacting and first.start == compact
    running = next_step(planned, {"compact": JobState.running}, True, [])
    assert running.phase == Phase.compacting and running.start is None
    second = next_step(planned, {"compact": JobState.succeeded}, True, [])
    assert second.start == dedup and second.phase == Phase.deduplicating
    assert next_step(planned, {}, True, ["compact", "dedup"]).start == decontam
    compacted = {"compact": JobState.succeeded, "dedup": JobState.succeeded}
    failed = next_step(planned, {**compacted, "decontaminate": JobState.failed}, True, [])
    assert failed.phase == Phase.failed and failed.failed == decontam
    done = {s.name: JobState.succeeded for s in planned}
    assert next_step(planned, done, True, []).phase == Phase.succeeded


def test_a_stage_with_workers_ends_with_its_own_job_and_fails_with_either() -> None:
    run = load_run(EXAMPLES / "cosmopedia-mixtral.yaml")
    planned = stages(run, PLATFORM)
    dedup, decontam, tokenize = planned[1:4]
    done = {"compact": JobState.succeeded, "dedup": JobState.succeeded}

    def step(**states: JobState) -> Any:
        jobs = {**done, **{name.replace("_", "-"): state for name, state in states.items()}}
        return next_step(planned, jobs, True, [])

    first = step()
    assert first.start == decontam and first.phase == Phase.decontaminating and first.stop == ()
    both = step(decontaminate=JobState.running, decontaminate_workers=JobState.running)
    assert (both.start, both.pool, both.stop, both.phase) == (None, None, (), Phase.decontaminating)
    # The pool went missing (deleted by hand) while the submitter waits: create it again.
    assert step(decontaminate=JobState.running).pool == decontam
    # Its workers all ended (idle, or a node drain) while work remains: delete it, then recreate.
    idle = step(decontaminate=JobState.running, decontaminate_workers=JobState.succeeded)
    assert idle.stop == ("decontaminate-workers",) and idle.pool is None
    assert idle.phase == Phase.decontaminating
    # The pool failed: the stage fails, naming the pool, and the waiting submitter is stopped.
    broken = step(decontaminate=JobState.running, decontaminate_workers=JobState.failed)
    assert broken.phase == Phase.failed and broken.failed == decontam
    assert broken.failed_part == "decontaminate-workers" and broken.stop == ("decontaminate",)
    # The submitter failed: the stage fails, naming it, and the workers are stopped.
    refused = step(decontaminate=JobState.failed, decontaminate_workers=JobState.running)
    assert refused.failed == decontam and refused.failed_part == "decontaminate"
    assert refused.stop == ("decontaminate-workers",)
    # The submitter succeeded: the next stage starts and idle workers still up are stopped.
    after = step(decontaminate=JobState.succeeded, decontaminate_workers=JobState.running)
    assert after.start == tokenize and after.stop == ("decontaminate-workers",)
    assert step(decontaminate=JobState.succeeded, decontaminate_workers=JobState.succeeded).stop == ()
    finished = {s.name: JobState.succeeded for s in planned} | {"decontaminate-workers": JobState.running}
    last = next_step(planned, finished, True, [])
    assert last.phase == Phase.succeeded and last.stop == ("decontaminate-workers",)
    assert dedup.pool is None and dedup.parts == ("dedup",)


def test_job_states() -> None:
    assert job_state(None) == JobState.missing
    assert job_state({"status": {}}) == JobState.running
    assert job_state({"status": {"succeeded": 1}}) == JobState.succeeded
    assert job_state({"spec": {"backoffLimit": 2}, "status": {"failed": 3}}) == JobState.failed
    assert job_state({"status": {"conditions": [{"type": "Failed", "status": "True"}]}}) == JobState.failed
    # An Indexed Job across 4 nodes: 3 nodes done is not the Job done.
    indexed = {"completionMode": "Indexed", "completions": 4}
    assert job_state({"spec": indexed, "status": {"succeeded": 3}}) == JobState.running
    assert job_state({"spec": indexed, "status": {"succeeded": 4}}) == JobState.succeeded


def test_counts_from_queue_and_dispatcher() -> None:
    assert not counts_from(QueueState(waiting=0, in_flight=0, stored=0, published=0), None).done
    assert not counts_from(QueueState(waiting=3, in_flight=0, stored=3, published=10), None).done
    drained = counts_from(QueueState(waiting=0, in_flight=0, stored=0, published=10), None)
    assert drained.done and drained.generated == 10
    status = {
        "phase": "PHASE_GENERATING",
        "prompts": 10,
        "generated": 4,
        "failed": 1,
        "tokens": 2000,
        "tokens_per_second": 12.5,
    }
    counts = counts_from(QueueState(waiting=0, in_flight=0, stored=0, published=10), status)
    assert not counts.done and counts == Counts(10, 4, 1, 2000, 12.5, False)
    assert progress_text(counts) == "5/10 (50%)"
    assert counts_from(None, {**status, "phase": "PHASE_SUCCEEDED"}).done
    failed = counts_from(None, {"phase": 4, "message": "seed file missing"})
    assert failed.error == "seed file missing"


def test_conditions_keep_their_transition_time_until_status_changes() -> None:
    first = set_condition([], "Valid", True, "SpecAccepted")
    again = set_condition(first, "Valid", True, "SpecAccepted", "still")
    assert again[0]["lastTransitionTime"] == first[0]["lastTransitionTime"] and again[0]["message"] == "still"
    flipped = set_condition(again, "Valid", False, "InvalidSpec")
    assert [c["status"] for c in flipped] == ["False"] and len(flipped) == 1


# --- run identity ----------------------------------------------------------------------------


def test_run_keys_streams_and_subjects_keep_namespaces_apart() -> None:
    assert queue.run_key("team-a", "twin") == "team-a/twin" and queue.run_key(None, "twin") == "twin"
    # The embedded `cosmo run` has no namespace: its names are the ones it always had.
    assert queue.stream_name("twin") == "COSMO_TWIN" and queue.prompts_subject("twin") == "cosmo.twin.prompts"
    keys = ["team-a/twin", "team-b/twin", "a-b/c", "a/b-c", "a--b/c", "a/b--c", "twin"]
    streams = [queue.stream_name(key) for key in keys]
    assert len(set(streams)) == len(keys), streams
    for key, stream in zip(keys, streams, strict=True):
        # JetStream refuses these in stream names; subjects use `.` between tokens.
        assert not set(stream) & set(" .*>/\\") and len(stream) <= 255
        for subject in (queue.prompts_subject(key), queue.events_subject(key)):
            assert subject.count(".") == 2 and not set(subject) & set(" *>/")
    longest = queue.run_key("n" * 63, "r" * 63)
    assert len(topology.decontam_stream_name(longest)) <= 255
    assert len({queue.prompts_subject(key) for key in keys}) == len(keys)


def test_a_spec_conflict_is_registered_again_only_after_the_spec_changes() -> None:
    conflicted = set_condition([], "Registered", False, CONFLICT, "the dispatcher refused gen/x")
    status = {"phase": "Failed", "observedGeneration": 3}
    assert not conflict_resolved(conflicted, 3, status)  # a timer pass: nothing changed
    assert conflict_resolved(conflicted, 4, status)  # the spec changed: ask once more
    unavailable = set_condition([], "Registered", False, "DispatcherUnavailable")
    assert not conflict_resolved(unavailable, 4, status)
    assert not conflict_resolved([], 4, status)


def test_a_conflict_says_what_to_do_in_one_line() -> None:
    details = "run 'gen/x' is Generating with another spec; cancel it first\nmore"
    message = conflict_message("gen/x", details)
    assert "\n" not in message and "cosmo cancel gen/x" in message and "is Generating" in message
