import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from pixrun import bench
from pixrun.bench import compare_diffusers, datasheet_peak_tflops, format_report, run_bench, stage_steps
from pixrun.cli import main
from pixrun.config import ConfigError, load_config
from pixrun.data.shapes import ShapesSource
from pixrun.flops import text_encoder_flops
from pixrun.train import Trainer
from tests.helpers import tiny_t5

CONFIGS = Path(__file__).parent.parent / "configs"


class Clock:
    """time.perf_counter as the bench reads it: it moves only where the test says the time goes."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_run_bench_times_the_steps_after_warm_up_and_the_batch_inside_them(tiny_config, monkeypatch):
    clock, steps_run, shapes_batch = Clock(), [], ShapesSource.batch

    def step(trainer, k):
        steps_run.append(k)
        clock.now += 10.0 if len(steps_run) <= 2 else 0.2  # warm-up steps are slow (allocation, kernel choice)
        return real_step(trainer, k)

    def batch(source, *args):
        clock.now += 0.05  # rendering a batch: inside the step, and measured again on its own
        return shapes_batch(source, *args)

    real_step = Trainer.step
    monkeypatch.setattr(Trainer, "step", step)
    monkeypatch.setattr(ShapesSource, "batch", batch)
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    monkeypatch.setattr(bench, "peak_tflops", lambda device, bf16: (2.0, "a test's peak"))
    result = run_bench(tiny_config(train__precision="fp32"), steps=4, warmup=2, device="cpu", label="tiny")
    assert steps_run == [0, 1, 2, 3, 4, 5]
    assert result["step_ms"] == pytest.approx(250) and result["data_ms"] == pytest.approx(50)
    assert result["images_per_s"] == pytest.approx(32)  # a batch of 8 each 0.25 s
    assert result["image_tokens"] == 16 and result["image_tokens_per_s"] == pytest.approx(32 * 16)
    flops = result["flops_per_image"]
    assert result["achieved_tflops"] == pytest.approx(32 * flops["total"] / 1e12)
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / 2.0)
    assert flops["text_encoder"] > 0 and flops["denoiser"] > 2 * flops["denoiser_forward"] > 0  # the small T5 trains
    assert (result["label"], result["device"], result["precision"], result["processes"]) == ("tiny", "cpu", "fp32", 1)
    assert 1 <= result["text_tokens"] <= 32 and result["peak_memory_gb"] > 0
    assert "MFU 0.0 % of 2 TFLOP/s (a test's peak)" in format_report(result)
    json.dumps(result)  # --json prints it as is


def test_run_bench_on_the_cpu_measures_the_matmul_peak_in_the_step_precision(tiny_config):
    result = run_bench(tiny_config(train__precision="fp32"), steps=1, warmup=0, device="cpu")
    assert result["peak_source"].startswith("measured float32 matmul")
    assert result["step_ms"] > result["data_ms"] > 0 and 0 < result["mfu"] < 1


def test_a_frozen_text_encoder_counts_its_forward_unless_its_states_come_cached(tiny_config, tmp_path):
    encoder = tiny_t5(tmp_path / "t5")
    config = tiny_config(text__encoder=encoder, text__dtype="float32")
    result = run_bench(config, steps=1, warmup=0, device="cpu")
    frozen = text_encoder_flops(config.text, AutoConfig.from_pretrained(encoder), round(result["text_tokens"]), False)
    assert result["flops_per_image"]["text_encoder"] == frozen > 0
    cached = run_bench(tiny_config(text__encoder=encoder, text__cache_dir=tmp_path / "cache"), steps=1, warmup=0,
                       device="cpu")
    assert cached["flops_per_image"]["text_encoder"] == 0


def test_compare_diffusers_gives_the_ratio_for_the_same_weights(tiny_config):
    result = compare_diffusers(tiny_config(train__precision="fp32"), steps=1, warmup=1, rounds=1, device="cpu")
    assert result["pixrun_ms"] > 0 and result["diffusers_ms"] > 0
    assert result["diffusers_over_pixrun"] == pytest.approx(result["diffusers_ms"] / result["pixrun_ms"])
    assert result["max_abs_output_difference"] < 1e-4  # the same model, so the same output in fp32
    assert "diffusers / pixrun" in format_report(result)


def test_datasheet_peaks_match_device_names_most_specific_first():
    assert datasheet_peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert datasheet_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert datasheet_peak_tflops("NVIDIA H200 NVL") == 835.0
    assert datasheet_peak_tflops("NVIDIA GH200 480GB") == 989.0
    assert datasheet_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert datasheet_peak_tflops("NVIDIA L40S") == 362.0
    assert datasheet_peak_tflops("NVIDIA L4") == 121.0
    assert datasheet_peak_tflops("Tesla T4") is None


def test_command_line_prints_one_json_object_and_rejects_bad_input(tiny_config, capsys):
    config = tiny_config()
    overrides = [f"run_dir={config.run_dir}", "data.resolution=32", "model.width=32", "model.depth=1",
                 "model.heads=2", "model.axes_dim=[8,8]", "model.patch_size=8", "model.bottleneck=16",
                 "text.width=32", "text.depth=1", "text.heads=2", "train.batch_size=2", "train.threads=1",
                 "repa.weight=0", "shapes_perceptual.weight=0"]
    assert main(["bench", *overrides, "--json", "--steps", "1", "--warmup", "0", "--compare-diffusers"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_depth"] == 1 and result["label"].startswith("built-in default run_dir=")
    assert main(["bench", *overrides, "--steps", "0"]) == 2
    assert main(["bench", "model.nonsense=1"]) == 2
    assert "pixrun: error:" in capsys.readouterr().err


def test_a_staged_config_is_timed_and_counted_in_the_stage_asked_for(monkeypatch):
    steps_run, real_step = [], Trainer.step
    monkeypatch.setattr(Trainer, "step", lambda trainer, k: steps_run.append(k) or real_step(trainer, k))
    config = load_config(CONFIGS / "prx-speedrun-cpu.yaml", ["train.precision=fp32"])
    second = run_bench(config, steps=1, warmup=1, device="cpu", stage=1)
    assert steps_run == [6, 7]  # the first steps of stage 1, which runs at 64 px, batch 4, without REPA
    assert (second["resolution"], second["batch_size"], second["image_tokens"]) == (64, 4, 64)
    flops = second["flops_per_image"]
    assert flops["repa"] == 0 and flops["lpips"] > 0 and flops["pdino"] > 0
    assert config.stages[1].until_step == 8  # the caller's config is left as it was


def test_a_stage_shorter_than_the_bench_is_stretched_in_proportion():
    config = load_config(CONFIGS / "prx-speedrun.yaml")
    assert stage_steps(config, 0, 15) == (config, range(15))
    assert stage_steps(config, 1, 20_000) == (config, range(100_000, 120_000))
    with pytest.raises(ConfigError, match="stages 0 to 1"):
        stage_steps(config, 2, 1)
    twin = load_config(CONFIGS / "prx-speedrun-cpu.yaml")  # stage 0: steps 0-5, REPA until 6; stage 1: 6-7
    stretched, steps = stage_steps(twin, 1, 5)
    assert steps == range(18, 23)  # 2 steps, 3 times over
    assert [s.until_step for s in stretched.stages] == [18, 24]
    assert (stretched.train.steps, stretched.repa.until_step) == (24, 18)
    assert stretched.stage_at(22)[0] is stretched.stages[1] and not stretched.repa.active(18)
    assert twin == load_config(CONFIGS / "prx-speedrun-cpu.yaml")  # the caller's config is left as it was


@pytest.mark.slow
def test_the_memory_estimate_runs_without_a_gpu_and_sees_what_checkpointing_saves(tmp_path):
    """benchmarks/memory_estimate.py --quick: FSDP2's memory tracker over a fake 4-rank group, no GPU."""
    out = tmp_path / "estimate.json"
    script = Path(__file__).parents[1] / "benchmarks" / "memory_estimate.py"
    subprocess.run([sys.executable, str(script), "--quick", "--out", str(out)], check=True,
                   capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    plain, checkpointed = json.loads(out.read_text())["cases"]
    assert not plain["activation_checkpointing"] and checkpointed["activation_checkpointing"]
    assert 0 < checkpointed["peak_bytes_per_gpu"] < plain["peak_bytes_per_gpu"]
