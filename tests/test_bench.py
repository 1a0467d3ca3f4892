import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pixrun.bench import compare_diffusers, config_flops, datasheet_peak_tflops, format_report, main, run_bench
from pixrun.config import load_config
from pixrun.flops import training_flops
from pixrun.losses.lpips import LPIPSConfig
from pixrun.losses.pdino import PDinoConfig
from pixrun.losses.repa import REPAConfig
from pixrun.model import TokenRouting


def test_run_bench_times_training_steps_and_reports_sane_figures(tiny_config):
    config = tiny_config(train__precision="fp32")
    result = run_bench(config, steps=2, warmup=1, device="cpu", label="tiny")
    assert result["label"] == "tiny" and result["device"] == "cpu" and result["precision"] == "fp32"
    assert result["processes"] == 1 and result["compile"] is False
    assert result["step_ms"] > result["data_ms"] > 0
    assert result["images_per_s"] == pytest.approx(8 / (result["step_ms"] / 1000))
    assert result["image_tokens"] == 16  # 32 px in 8-px patches
    assert result["image_tokens_per_s"] == pytest.approx(16 * result["images_per_s"])
    assert 1 <= result["text_tokens"] <= config.text.max_tokens
    flops = result["flops_per_image"]
    assert flops["denoiser"] == 3 * flops["denoiser_forward"] > 0
    assert flops["text_encoder"] > 0  # the small T5 trains jointly
    assert flops["total"] == flops["denoiser"] + flops["text_encoder"] + flops["losses"]
    assert result["achieved_tflops"] == pytest.approx(flops["total"] * result["images_per_s"] / 1e12)
    assert result["peak_source"].startswith("measured float32 matmul")
    assert 0 < result["mfu"] <= 1
    assert result["mfu"] == pytest.approx(result["achieved_tflops"] / result["peak_tflops"])
    assert result["peak_memory_gb"] > 0
    assert "MFU" in format_report(result) and "images/s" in format_report(result)
    json.dumps(result)  # --json prints it as is


def test_flops_in_the_report_follow_the_config(tiny_config):
    small, wide = tiny_config(), tiny_config(model__width=64, model__axes_dim="[8,8]", model__heads=4)
    assert config_flops(wide, 8).denoiser > 2 * config_flops(small, 8).denoiser
    assert config_flops(small, 16).denoiser > config_flops(small, 8).denoiser  # text tokens are keys and values


def test_flops_count_the_losses_and_routing_the_config_switches_on(tiny_config):
    config = tiny_config(model__depth=4)
    config.tread = TokenRouting(enabled=True, fraction=0.5, start=1, end=-1)
    config.lpips = LPIPSConfig(weight=0.1, downsample=0.5)
    config.pdino = PDinoConfig(weight=0.0)  # off
    config.repa = REPAConfig(weight=0.5, block=2, until_step=100, hidden=64)
    expected = training_flops(config.model, 32, 8, routing=config.tread, lpips_size=16, repa_block=2, repa_hidden=64)
    assert config_flops(config, 8, step=99) == expected
    assert config_flops(config, 8, step=100).repa == 0  # REPA switched off from until_step on
    config.tread.enabled = False
    assert config_flops(config, 8).denoiser > expected.denoiser


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
                 "text.width=32", "text.depth=1", "text.heads=2", "train.batch_size=2", "train.threads=1"]
    assert main([*overrides, "--json", "--steps", "1", "--warmup", "0", "--compare-diffusers"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_depth"] == 1 and result["label"].startswith("built-in default run_dir=")
    assert main([*overrides, "--steps", "0"]) == 2
    assert main(["model.nonsense=1"]) == 2
    assert "pixrun: error:" in capsys.readouterr().err


def test_a_staged_config_is_timed_and_counted_one_stage_at_a_time():
    from pathlib import Path

    from pixrun.bench import one_stage

    config = load_config(Path(__file__).parent.parent / "configs" / "prx-speedrun.yaml")
    first, second = one_stage(config, 0), one_stage(config, 1)
    assert (first.data.resolution, first.train.batch_size, first.repa.weight) == (512, 1024, 0.5)
    assert (second.data.resolution, second.train.batch_size, second.repa.weight) == (1024, 512, 0.0)
    assert second.lpips.weight == 0.1 and second.data.shards == "data/prepared-1024" and not second.stages


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
