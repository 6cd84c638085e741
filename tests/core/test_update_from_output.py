"""Scheduler.update_from_output without a model: what one step's sampled tokens do to the requests."""

from pagedserve.config import SchedulerConfig
from pagedserve.core.kv_cache_manager import KVCacheManager
from pagedserve.core.request import Request, RequestStatus
from pagedserve.core.sched.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams
from pagedserve.worker.runner_output import ModelRunnerOutput

EOS = 2


def _setup(*params: SamplingParams, prompt_len: int = 5):
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=100), kv, max_model_len=64)
    reqs = [Request(f"r{i}", list(range(10, 10 + prompt_len)), p, eos_token_id=EOS) for i, p in enumerate(params)]
    for r in reqs:
        sched.add_request(r)
    return kv, sched, reqs


def _output(tokens: dict[str, list[int]]) -> ModelRunnerOutput:
    return ModelRunnerOutput(list(tokens), list(tokens.values()))


def test_several_tokens_for_one_request_in_one_step():
    kv, sched, (a,) = _setup(SamplingParams(max_tokens=10))
    out = sched.schedule()
    core = sched.update_from_output(out, _output({"r0": [7]}))
    assert [(o.request_id, o.new_token_ids, o.finish_reason) for o in core.outputs] == [("r0", [7], None)]
    # the next step verifies two proposed tokens: the runner accepts both and samples a third
    a.spec_token_ids = [8, 9]
    out = sched.schedule()
    assert out.scheduled[0].num_new_tokens == 3 and out.scheduled[0].num_spec_tokens == 2
    core = sched.update_from_output(out, _output({"r0": [8, 9, 4]}))
    assert core.outputs[0].new_token_ids == [8, 9, 4]
    assert a.output_token_ids == [7, 8, 9, 4]
    assert a.num_computed_tokens == 5 + 3  # the prompt, 7, 8 and 9 are cached; 4 is fed next step
    assert sched.schedule().scheduled[0].num_new_tokens == 1


def test_rejected_proposals_are_recomputed():
    kv, sched, (a,) = _setup(SamplingParams(max_tokens=10))
    sched.update_from_output(sched.schedule(), _output({"r0": [7]}))
    a.spec_token_ids = [8, 9]
    out = sched.schedule()
    sched.update_from_output(out, _output({"r0": [8, 5]}))  # 8 accepted, 9 rejected, 5 sampled instead
    assert a.output_token_ids == [7, 8, 5] and a.spec_token_ids == []
    assert a.num_computed_tokens == 5 + 2  # the slot of 9 is not counted: it is rewritten, never read


def test_stop_token_mid_list_drops_the_rest_and_frees_blocks():
    kv, sched, (a, b) = _setup(SamplingParams(max_tokens=10, stop_token_ids=[99]), SamplingParams(max_tokens=10))
    sched.update_from_output(sched.schedule(), _output({"r0": [7], "r1": [7]}))
    out = sched.schedule()
    core = sched.update_from_output(out, _output({"r0": [8, 99, 6], "r1": [EOS, 3]}))
    by_id = {o.request_id: o for o in core.outputs}
    assert by_id["r0"].new_token_ids == [8, 99] and by_id["r0"].finish_reason == "stop"
    assert by_id["r0"].stop_reason == 99
    assert by_id["r1"].new_token_ids == [EOS] and by_id["r1"].finish_reason == "stop"
    assert by_id["r1"].stop_reason is None  # EOS
    assert a.output_token_ids == [7, 8, 99] and b.output_token_ids == [7, EOS]
    assert kv.stats().free_blocks == kv.stats().total_blocks and not sched.running
    assert sched.schedule().finished_req_ids == {"r0", "r1"}  # the runner is told to drop their state


def test_max_tokens_reached_mid_list():
    kv, sched, (a,) = _setup(SamplingParams(max_tokens=3))
    sched.update_from_output(sched.schedule(), _output({"r0": [7]}))
    core = sched.update_from_output(sched.schedule(), _output({"r0": [8, 9, 10, 11]}))
    assert core.outputs[0].new_token_ids == [8, 9] and core.outputs[0].finish_reason == "length"
    assert a.output_token_ids == [7, 8, 9] and a.status == RequestStatus.FINISHED_LENGTH


def test_min_tokens_keeps_eos_from_stopping_early():
    kv, sched, (a,) = _setup(SamplingParams(max_tokens=10, min_tokens=2))
    core = sched.update_from_output(sched.schedule(), _output({"r0": [EOS]}))
    assert core.outputs[0].finish_reason is None
    core = sched.update_from_output(sched.schedule(), _output({"r0": [EOS, EOS]}))
    assert core.outputs[0].new_token_ids == [EOS, EOS] and core.outputs[0].finish_reason == "stop"


def test_aborted_request_whose_output_arrives_late():
    kv, sched, (a, b) = _setup(SamplingParams(max_tokens=10), SamplingParams(max_tokens=10))
    out = sched.schedule()
    assert sched.abort_requests(["r0"]) == ["r0"]  # aborted while its step ran
    core = sched.update_from_output(out, _output({"r0": [7], "r1": [7]}))
    assert [o.request_id for o in core.outputs] == ["r1"]
    assert a.output_token_ids == [] and a.status == RequestStatus.FINISHED_ABORTED
    assert a.num_computed_tokens == 0
    assert sched.abort_requests(["r0", "unknown"]) == []  # twice, or never known: nothing happens
    assert kv.stats().used_blocks == len(kv.get_block_ids(b))


def test_prompt_chunk_short_of_the_end_samples_nothing():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(max_num_batched_tokens=4), kv, max_model_len=64)
    a = Request("r0", list(range(10)), SamplingParams(max_tokens=4))
    sched.add_request(a)
    core = sched.update_from_output(sched.schedule(), ModelRunnerOutput())
    assert core.outputs == [] and a.num_computed_tokens == 4


def test_context_length_ends_a_request():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(SchedulerConfig(), kv, max_model_len=7)
    a = Request("r0", list(range(5)), SamplingParams(max_tokens=100))
    sched.add_request(a)
    sched.update_from_output(sched.schedule(), _output({"r0": [7]}))
    core = sched.update_from_output(sched.schedule(), _output({"r0": [8]}))
    assert core.outputs[0].finish_reason == "length" and a.num_tokens == 7
