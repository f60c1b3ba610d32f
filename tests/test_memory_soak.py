"""script/memory-soak: its plan of varied predictions, its growth figures, and a short run
against Cog's real HTTP server on the bundled model (the 200-prediction soak is the script's)."""

from collections import Counter

import pytest

from sdcog.model.weights import BUNDLED_MODEL_DIR
from sdcog.resolve.schedulers import SCHEDULER_NAMES
from sdcog_tools.memory_soak import (
    CYCLE_LENGTH,
    MODES,
    REFUSED,
    SIZES,
    Planned,
    Sample,
    SoakRecord,
    check_outcome,
    failures,
    plan,
    run_soak,
    slope,
    summarize,
)


def test_one_cycle_runs_every_mode_at_every_size_every_scheduler_and_refused_inputs():
    cycle = plan(CYCLE_LENGTH)
    generated = [planned for planned in cycle if planned.mode != REFUSED]
    assert Counter((planned.mode, planned.size) for planned in generated) == {
        (mode, size): 1 for mode in MODES for size in SIZES
    }
    assert Counter(planned.inputs["scheduler"] for planned in generated) == {
        name: 2 for name in SCHEDULER_NAMES
    }
    assert {planned.num_outputs for planned in generated} == {1, 2, 3, 4}
    assert {planned.inputs["output_format"] for planned in generated} == {"webp", "png", "jpg"}
    refused = [planned for planned in cycle if planned.mode == REFUSED]
    assert len({planned.expected_error for planned in refused}) == len(refused) == 4
    # every other one steered by ControlNets, in every mode; some by two, their maps returned
    steered = [planned for planned in generated if planned.controlnets]
    assert len(steered) == len(generated) // 2 and {planned.mode for planned in steered} == set(MODES)
    assert {planned.controlnets for planned in steered} == {1, 2}
    assert all(planned.control_maps == 2 for planned in steered if planned.controlnets == 2)
    assert not any(planned.controlnets for planned in plan(CYCLE_LENGTH, controlnet=None))
    for planned in generated:
        assert all(side % 8 == 0 and 64 <= side <= 192 for side in planned.size)
        assert 2 <= planned.inputs["num_inference_steps"] <= 6
        assert None not in planned.inputs.values()  # Cog refuses an explicit JSON null


def test_later_cycles_repeat_the_first_with_new_seeds_and_prompts():
    planned = plan(2 * CYCLE_LENGTH + 1)
    for first, again in zip(planned[:CYCLE_LENGTH], planned[CYCLE_LENGTH:], strict=False):
        assert (first.mode, first.size, first.num_outputs, first.expected_error) == (
            again.mode,
            again.size,
            again.num_outputs,
            again.expected_error,
        )
        same_request = {name: value for name, value in first.inputs.items() if name not in {"seed", "prompt"}}
        assert same_request == {
            name: value for name, value in again.inputs.items() if name not in {"seed", "prompt"}
        }
        assert again.inputs["seed"] == first.inputs["seed"] + CYCLE_LENGTH
    assert plan(50) == plan(60)[:50]


def test_slope_is_the_least_squares_line_through_the_samples():
    assert slope([5.0, 5.0, 5.0]) == 0.0
    assert slope([1.0, 3.0, 5.0, 7.0]) == pytest.approx(2.0)
    assert slope([0.0, 2.0, 0.0, 2.0]) == pytest.approx(0.4)
    assert slope([3.0]) == 0.0


def test_growth_is_measured_from_the_sample_after_warm_up_to_the_last():
    # A warm-up climb from 100 to 175 MiB, then 201, 202, ... 250 MiB: +1 MiB per prediction.
    values = [100.0 + 25 * index for index in range(4)] + [200.0 + index for index in range(1, 51)]
    summary = summarize(values, warmup=4)
    assert summary["after_warmup_mib"] == 175.0 and summary["end_mib"] == 250.0
    assert summary["samples_after_warmup"] == 50
    assert summary["growth_pct"] == pytest.approx(100 * 75 / 175, abs=1e-3)
    assert summary["max_mib"] == 250.0
    flat = summarize([100.0, 300.0, 200.0, 201.0, 199.0, 200.0], warmup=3)
    assert flat["growth_pct"] == 0.0 and flat["slope_per_100"] == pytest.approx(-20.0)
    assert flat["max_mib"] == 300.0 and flat["max_after_warmup_mib"] == 201.0
    assert summarize([100.0, 101.0], warmup=2)["growth_pct"] is None


def _record(values, warmup, problems=()):
    problems = list(problems) + [None] * (len(values) - len(problems))
    record = SoakRecord(len(values), warmup, CYCLE_LENGTH, "weights", {}, {}, {})
    record.samples = [
        Sample(index, "txt2img", "d", "succeeded", problem is None, problem, 0.1, value, value, value)
        for index, (value, problem) in enumerate(zip(values, problems, strict=True))
    ]
    record.summary = {"worker_rss": summarize(values, warmup)}
    return record


def test_soak_fails_over_the_growth_limit_or_on_an_unplanned_outcome():
    assert failures(_record([100.0, 104.0, 104.9], warmup=2), max_growth_pct=5) == []
    assert "grew 6.00%" in failures(_record([100.0, 100.0, 106.0], warmup=2), max_growth_pct=5)[0]
    [reason] = failures(_record([100.0, 100.0, 100.0], warmup=2, problems=["ended 'failed'"]), 5)
    assert reason.startswith("prediction 0") and "ended 'failed'" in reason


def test_outcome_check_wants_the_planned_number_of_images_or_the_field_named_error():
    made = Planned(0, "txt2img", {}, num_outputs=2)
    refused = Planned(1, REFUSED, {}, expected_error="width: must be a multiple of 8")
    assert check_outcome(made, 200, {"status": "succeeded", "output": ["a", "b"]}) is None
    assert "1 outputs" in check_outcome(made, 200, {"status": "succeeded", "output": ["a"]})
    assert "failed" in check_outcome(made, 200, {"status": "failed", "error": "boom"})
    assert (
        check_outcome(refused, 200, {"status": "failed", "error": "width: must be a multiple of 8, got"})
        is None
    )
    assert "does not contain" in check_outcome(refused, 200, {"status": "failed", "error": "height: x"})
    assert "not 'failed'" in check_outcome(refused, 200, {"status": "succeeded", "output": []})
    assert check_outcome(made, 422, {"detail": []}).startswith("HTTP 422")


def test_a_short_soak_through_the_real_server_samples_the_worker_after_every_prediction(bundled_server):
    count = 10  # the four modes, at sizes 64 to 192, and one refused input (the 10th)
    seen = []
    server = bundled_server
    record = run_soak(server, BUNDLED_MODEL_DIR, count=count, warmup=5, on_sample=seen.append)
    assert server.health()["status"] == "READY"
    assert [sample.index for sample in record.samples] == list(range(count)) == [s.index for s in seen]
    assert [sample.problem for sample in record.samples] == [None] * count
    assert {sample.mode for sample in record.samples} == {*MODES, REFUSED}
    assert record.samples[-1].status == "failed" and record.samples[0].status == "succeeded"
    assert "_run_worker" in record.worker["cmdline"]
    assert "unet/diffusion_pytorch_model.safetensors" in record.worker["evidence"]
    for sample in record.samples:
        # The worker holds the model (hundreds of MiB); the tree adds the server process.
        assert 200 < sample.worker_rss_mib < sample.tree_rss_mib
        assert 0 < sample.worker_uss_mib <= sample.worker_rss_mib
    assert record.summary["worker_rss"]["samples_after_warmup"] == count - 5
    assert record.summary["worker_uss"]["growth_pct"] is not None
    assert record.summary["unexpected_outcomes"] == 0
    assert record.to_json()["samples"][0]["worker_rss_mib"] == record.samples[0].worker_rss_mib
