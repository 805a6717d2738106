"""The in-flight controller, driven step by step with engine readings, answers and errors."""

from __future__ import annotations

import pytest

from cosmoforge.generation.inflight import EngineLoad, InflightController, parse_engine_metrics
from cosmoforge.generation.load import WorkerLoad, saturation

VLLM_METRICS = """\
# HELP vllm:num_requests_running Number of requests currently running on GPU.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{model_name="m"} 12.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{model_name="m"} 3.0
# HELP vllm:gpu_cache_usage_perc GPU KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:gpu_cache_usage_perc gauge
vllm:gpu_cache_usage_perc{model_name="m"} 0.42
# HELP vllm:num_preemptions_total Cumulative number of preemption from the engine.
# TYPE vllm:num_preemptions_total counter
vllm:num_preemptions_total{model_name="m"} 7.0
# HELP vllm:e2e_request_latency_seconds Histogram of end to end request latency in seconds.
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="1.0",model_name="m"} 4.0
vllm:e2e_request_latency_seconds_count{model_name="m"} 4.0
vllm:e2e_request_latency_seconds_sum{model_name="m"} 2.0
"""

TGI_METRICS = """\
# TYPE tgi_queue_size gauge
tgi_queue_size 5
# TYPE tgi_batch_current_size gauge
tgi_batch_current_size 30
# TYPE tgi_request_count counter
tgi_request_count 120
"""


def test_vllm_metrics_are_read():
    assert parse_engine_metrics(VLLM_METRICS) == EngineLoad(
        running=12.0, waiting=3.0, kv_usage=0.42, preemptions=7.0
    )


def test_vllm_v1_kv_cache_name_and_label_sets_are_summed():
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0"} 4\n'
        'vllm:num_requests_running{engine="1"} 6\n'
        "# TYPE vllm:kv_cache_usage_perc gauge\n"
        "vllm:kv_cache_usage_perc 0.9\n"
    )
    assert parse_engine_metrics(text) == EngineLoad(running=10.0, waiting=0.0, kv_usage=0.9)


def test_tgi_metrics_are_read():
    assert parse_engine_metrics(TGI_METRICS) == EngineLoad(running=30.0, waiting=5.0)


def test_metrics_of_another_program_say_nothing():
    assert (
        parse_engine_metrics("# TYPE python_gc_objects_collected counter\npython_gc_objects_collected 3\n")
        is None
    )
    assert parse_engine_metrics("") is None


def busy(controller: InflightController) -> None:
    """The worker fills every slot the limit allows."""
    controller.started(controller.limit)


def test_limit_grows_while_the_engine_admits_everything():
    c = InflightController(1, 512, 8, timeout=600)
    limits = []
    for step in range(20):
        busy(c)
        c.engine(float(step), EngineLoad(running=c.limit, waiting=0))
        limits.append(c.limit)
    assert limits == sorted(limits) and limits[-1] > 8 * 4
    assert not c.state(20.0).saturated and c.state(20.0).engine_signals


def test_limit_stops_at_the_upper_bound():
    c = InflightController(1, 40, 32, timeout=600)
    for step in range(50):
        busy(c)
        c.engine(float(step), EngineLoad(running=c.limit, waiting=0))
    assert c.limit == 40


def test_limit_does_not_grow_when_the_worker_cannot_fill_it():
    c = InflightController(1, 512, 32, timeout=600)
    for step in range(10):
        c.started(5)  # few prompts left: only 5 ever in flight
        c.engine(float(step), EngineLoad(running=5, waiting=0))
    assert c.limit == 32


def test_an_engine_queue_brings_the_limit_back_to_its_batch_plus_a_small_queue():
    c = InflightController(1, 512, 200, timeout=600)
    busy(c)
    # The engine batches 100 and queues the other 100 of this worker.
    c.engine(0.0, EngineLoad(running=100, waiting=100))
    assert 100 <= c.limit <= 120
    assert c.state(0.0).saturated and c.reason == "engine queue"


def test_queue_cuts_do_not_compound_while_requests_sent_before_them_still_wait():
    c = InflightController(1, 512, 200, timeout=600)
    busy(c)
    c.engine(1.0, EngineLoad(running=100, waiting=100))
    first = c.limit
    # The 200 sent before the cut are still there: the same reading keeps the same limit.
    c.engine(2.0, EngineLoad(running=100, waiting=100))
    assert c.limit == first
    # Once in flight came down to the limit, a queue that persists (another worker joined)
    # cuts again.
    c.started(first)
    c.engine(3.0, EngineLoad(running=100, waiting=60))
    assert c.limit < first


def test_overload_cuts_wait_one_latency_for_the_previous_one_to_take_effect():
    c = InflightController(1, 512, 100, timeout=600)
    c.completed(0.0, latency=10.0, tokens=100, in_flight=99)
    c.failed(1.0, "server_error", in_flight=99)
    first = c.limit
    c.failed(2.0, "server_error", in_flight=98)
    assert c.limit == first
    c.failed(12.0, "server_error", in_flight=69)
    assert c.limit < first


def test_the_limit_waits_for_the_engine_to_take_in_what_was_sent():
    c = InflightController(1, 512, 64, timeout=600)
    busy(c)
    c.engine(0.0, EngineLoad(running=20, waiting=0))  # 44 requests still on their way
    assert c.limit == 64
    c.engine(1.0, EngineLoad(running=64, waiting=0))
    assert c.limit > 64


def test_a_full_kv_cache_or_preemptions_hold_the_limit():
    c = InflightController(1, 512, 64, timeout=600)
    busy(c)
    c.engine(0.0, EngineLoad(running=64, waiting=0, kv_usage=0.97, preemptions=0))
    assert c.limit == 64 and c.state(0.0).saturated and c.reason == "KV cache full"
    busy(c)
    c.engine(1.0, EngineLoad(running=60, waiting=4, kv_usage=0.9, preemptions=3))
    assert c.limit == 64 and c.state(1.0).saturated and c.reason == "preemptions"
    busy(c)
    c.engine(2.0, EngineLoad(running=64, waiting=0, kv_usage=0.5, preemptions=3))
    assert c.limit > 64 and not c.state(2.0).saturated


def test_overload_errors_cut_multiplicatively_and_other_errors_do_not():
    c = InflightController(1, 512, 100, timeout=600)
    c.failed(0.0, "connection", in_flight=99)
    c.failed(0.0, "invalid_request", in_flight=99)
    assert c.limit == 100
    c.failed(0.0, "rate_limited", in_flight=99)
    assert c.limit == 70 and c.state(0.0).saturated
    c.failed(10.0, "timeout", in_flight=69)
    assert c.limit == 49


def test_the_limit_never_goes_below_the_lower_bound():
    c = InflightController(4, 512, 5, timeout=600)
    for step in range(10):
        c.failed(float(step * 10), "server_error", in_flight=1)
    assert c.limit == 4


def test_answers_slower_than_half_the_timeout_cut_the_limit():
    c = InflightController(1, 512, 100, timeout=60)
    c.completed(0.0, latency=20.0, tokens=100, in_flight=99)
    assert c.limit == 100
    c.completed(1.0, latency=31.0, tokens=100, in_flight=99)
    assert c.limit == 80 and c.reason == "slow requests"


def drive_without_metrics(c: InflightController, capacity: float, until: float) -> float:
    """A server that batches up to `capacity` sequences and queues the rest, answering 100-token
    requests that take 1 s alone and longer as the batch grows; the client always fills the limit."""
    now = 0.0
    while now < until:
        busy(c)
        batch = min(c.limit, capacity)
        service = 1.0 + batch / 50  # step time grows with the batch
        latency = service * c.limit / batch  # the rest waits in the server's queue
        # One answer per slot per latency: advance time by the spacing of answers.
        now += latency / c.limit
        c.completed(now, latency=latency, tokens=100, in_flight=c.limit - 1)
    return now


def test_without_engine_metrics_the_limit_climbs_to_where_tokens_per_second_stop_growing():
    c = InflightController(1, 512, 4, timeout=600)
    drive_without_metrics(c, capacity=64, until=400.0)
    assert 48 <= c.limit <= 128, c.limit
    assert c.state(400.0).saturated and not c.state(400.0).engine_signals


def test_without_engine_metrics_an_unsaturated_server_gets_the_upper_bound():
    c = InflightController(1, 96, 4, timeout=600)
    drive_without_metrics(c, capacity=10_000, until=300.0)
    assert c.limit == 96


@pytest.mark.parametrize(("minimum", "maximum"), [(0, 4), (5, 4)])
def test_bounds_are_checked(minimum: int, maximum: int):
    with pytest.raises(ValueError, match="bounds"):
        InflightController(minimum, maximum, 1, timeout=1)


def test_the_start_is_clamped_into_the_bounds():
    assert InflightController(1, 16, 32, timeout=1).limit == 16
    assert InflightController(8, 16, 2, timeout=1).limit == 8


def test_worker_load_round_trips_and_saturation_is_a_share():
    loads = [
        WorkerLoad("a", "http://x", 10, 9, True, "engine queue"),
        WorkerLoad("b", "http://x", 4, 4, False),
    ]
    assert [WorkerLoad.decode(load.encode()) for load in loads] == loads
    assert WorkerLoad.decode(b"not json") is None
    assert saturation(loads) == 0.5
    assert saturation([]) is None
