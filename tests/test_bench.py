"""script/bench: its arithmetic, and one cheap in-process run that yields every figure."""

import json

import pytest
import torch

from sdcog_tools import bench, bench_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_median_and_ratio_ignore_what_is_missing():
    assert bench.median([3, None, 1, 2]) == 2
    assert bench.median([4, 1, 3, 2]) == 2.5
    assert bench.median([None]) is None
    assert bench.ratio(3, 2) == 1.5
    assert bench.ratio(None, 2) is None
    assert bench.ratio(1, 0) is None
    assert bench.ratio(1, None) is None


def test_phases_split_a_run_at_its_first_and_last_step():
    # Started at 10.0, steps ended 0.1 s apart from 10.3 on, the run ended at 11.0.
    run = bench.phases(10.0, 11.0, [10.3, 10.4, 10.5, 10.6])
    assert run["steps"] == 4
    assert run["step_s"] == pytest.approx(0.1)
    assert run["before_s"] == pytest.approx(0.2)  # the first step began at 10.2
    assert run["after_s"] == pytest.approx(0.4)
    assert run["outside_share"] == pytest.approx(0.6)
    assert bench.phases(0.0, 1.5, []) == {"total_s": 1.5, "steps": 0}  # HTTP: end to end only


def test_summarize_takes_medians_and_the_fastest_run():
    runs = [bench.phases(0.0, total, [0.1, 0.2, 0.3]) for total in (1.0, 3.0, 2.0)]
    summary = bench.summarize(runs)
    assert summary["total_s"] == 2.0
    assert summary["fastest_s"] == 1.0
    assert summary["step_s"] == pytest.approx(0.1)


def test_targets_pass_fail_and_skip():
    ratios = {"latency": 1.05, "http_minus_predict_ms": 150.0, "http_minus_plain_ms": None, "setup": 1.2}
    verdicts = [target["ok"] for target in bench_report.targets({"ratios": ratios, "encoding": {"ms": 29.0}})]
    assert verdicts == [True, False, None, True, True]


def test_the_gpu_targets_apply_to_the_real_size_presets_on_a_gpu():
    record = {
        "ratios": {"latency": 0.41, "http_minus_predict_ms": None, "http_minus_plain_ms": None, "setup": 1.1},
        "encoding": {"ms": 77.0},
        "settings": {"device": "cuda"},
        "latency": {"project": {"total_s": 1.25}},
    }
    sd15 = bench_report.targets({**record, "name": "sd15-real-arch"})
    assert [(target["target"], target["ok"]) for target in sd15[:1]] == [
        ("GPU: project at least 1.8x faster than plain end to end", True)
    ]
    sdxl = bench_report.targets({**record, "name": "sdxl-real-arch"})
    assert [(target["target"], target["ok"]) for target in sdxl[:1]] == [
        ("GPU: project under 1.5 s end to end", True)
    ]
    slow = {**record, "name": "sd15-real-arch", "ratios": {**record["ratios"], "latency": 0.6}}
    assert bench_report.targets(slow)[0]["ok"] is False
    on_cpu = {**record, "name": "sd15-real-arch", "settings": {"device": "cpu"}}
    assert len(bench_report.targets(on_cpu)) == 5


def test_a_cheap_run_has_every_figure_and_a_png_plot(tiny_sd15, tmp_path):
    record = bench.run_bench(
        tiny_sd15, torch.device("cpu"), width=64, height=64, steps=2, reps=1, http=False, setup_reps=0
    )
    record["name"], record["targets"] = "tiny-sd15", bench_report.targets(record)

    for path in (bench.PLAIN, bench.PROJECT, bench.PREDICT):
        figures = record["latency"][path]
        assert figures["steps"] == 3, path  # PNDM (the model's own scheduler) adds one step
        for key in ("total_s", "fastest_s", "step_s", "before_s", "after_s", "outside_share"):
            assert figures[key] is not None and figures[key] == figures[key], (path, key)  # not NaN
        assert 0 < figures["step_s"] < figures["total_s"]
    assert bench.HTTP not in record["latency"]
    assert record["settings"]["scheduler"] == "PNDM"
    assert (record["settings"]["width"], record["settings"]["height"]) == (64, 64)
    for path in (bench.PLAIN, bench.PROJECT):
        assert record["setup"][path]["load_s"] > 0
        assert record["memory_mib"][path] is not None
    assert record["encoding"]["ms"] > 0 and record["encoding"]["kb_per_image"] > 0
    for name in ("setup", "latency", "step", "predict", "memory"):
        assert record["ratios"][name] is not None, name
    assert record["ratios"]["http_minus_predict_ms"] is None
    assert record["machine"]["torch"] == torch.__version__
    assert len(record["load_average"]["start"]) == 3
    json.loads(json.dumps(record))  # JSON-ready as it is

    report = bench_report.format_report(record)
    assert "latency ms" in report and "per denoising step ms" in report
    assert "SKIP: HTTP within max(+100 ms, 1.25x) of plain: not measured" in report
    bench_report.plot(record, tmp_path / "bench.png")
    assert (tmp_path / "bench.png").read_bytes().startswith(PNG_SIGNATURE)


def test_the_training_bench_reports_every_figure(tmp_path):
    from sdcog_tools import bench_training

    out = tmp_path / "training.json"
    argv = [
        "--steps",
        "2",
        "--warmup",
        "1",
        "--batch",
        "1",
        "--rank",
        "2",
        "--resolution",
        "64",
        "--json",
        str(out),
    ]
    assert bench_training.main(argv) == 0
    figures = json.loads(out.read_text())
    assert figures["timed_steps"] == 2 and figures["step_s"] > 0 and figures["images_per_s"] > 0
    assert figures["peak_memory_gb"] > 0 and figures["lora_parameters_m"] > 0
    assert figures["extrapolated_1000_steps_min"] == pytest.approx(figures["step_s"] * 1000 / 60, rel=0.01)
