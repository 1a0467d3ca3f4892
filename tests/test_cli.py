import subprocess
import sys

import pytest

from pixrun.cli import main
from pixrun.config import ConfigError, load_config
from tests.conftest import TINY_OVERRIDES


def run_cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.learning_rate=1e-3", "unknown config key 'optim.learning_rate'"),
        ("nonsense=1", "unknown config key 'nonsense'"),
        ("model.patch_size=24", "model.patch_size 24 does not divide data.resolution 64"),
        ("train.steps=abc", "train.steps must be an integer"),
        ("train.steps=0", "train.steps must be positive"),
        ("flow.prediction=score", "flow.prediction must be one of"),
        ("model.preset=huge", "model.preset 'huge' is not known"),
        ("data.heldout=[golden circle]", "golden"),
    ],
)
def test_bad_config_is_one_line_and_exit_code_2(capsys, tmp_path, override, message):
    code, _, err = run_cli(capsys, "train", f"run_dir={tmp_path}/r", override)
    assert code == 2
    assert message in err and err.startswith("pixrun: error:") and len(err.strip().splitlines()) == 1


def test_unknown_key_in_a_yaml_file(capsys, tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("optim:\n  lr: 3e-4\n  momentum: 0.9\n")
    code, _, err = run_cli(capsys, "train", str(path))
    assert code == 2 and "optim.momentum" in err
    code, _, err = run_cli(capsys, "train", str(tmp_path / "missing.yaml"))
    assert code == 2 and "does not exist" in err


def test_config_file_then_overrides(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("model: prx-small-pixel\ndata:\n  resolution: 512\noptim:\n  lr: 3e-4\n")
    config = load_config(path, ["optim.lr=1e-4", "model.depth=4"])
    assert config.optim.lr == 1e-4 and config.model.width == 1792 and config.model.depth == 4
    with pytest.raises(ConfigError, match="does not divide"):
        load_config(path, ["data.resolution=500"])


def test_missing_run_and_empty_prompt(capsys, tmp_path):
    code, _, err = run_cli(capsys, "sample", str(tmp_path / "nope"), "--prompt", "a photo of a circle")
    assert code == 2 and "not a pixrun run" in err
    code, _, err = run_cli(capsys, "eval", str(tmp_path / "nope"), "--json")
    assert code == 2 and "not a pixrun run" in err
    code, _, err = run_cli(capsys, "sample", str(tmp_path), "--prompt", "   ")
    assert code == 2 and "prompt is empty" in err


def test_sample_and_eval_on_a_trained_run(capsys, tmp_path):
    import json

    from PIL import Image

    code, _, _ = run_cli(capsys, "train", *[f"run_dir={tmp_path / 'r'}", *TINY_OVERRIDES, "train.steps=2"])
    assert code == 0
    out = tmp_path / "a.png"
    code, stdout, _ = run_cli(capsys, "sample", str(tmp_path / "r"), "--prompt", "a photo of a red circle",
                              "--num", "2", "--out", str(out), "--steps", "3")
    assert code == 0 and stdout.strip() == str(out)
    assert Image.open(out).size == (64, 32)
    code, stdout, _ = run_cli(capsys, "eval", str(tmp_path / "r"), "--json")
    assert code == 0
    scores = json.loads(stdout)
    keys = {"overall", "single_object", "two_object", "counting", "colors", "position", "color_attr", "heldout_overall"}
    assert keys <= set(scores) and all(0 <= scores[k] <= 1 for k in keys)


def test_installed_command_exits_2_without_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pixrun.cli", "train", f"run_dir={tmp_path}", "model.patch_size=7"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "does not divide" in result.stderr


def test_shipped_configs_load_and_the_cpu_one_is_the_builtin_default():
    from pathlib import Path

    from pixrun.config import Config

    root = Path(__file__).parent.parent / "configs"
    for path in root.glob("*.yaml"):
        load_config(path)
    assert load_config(root / "shapes-cpu.yaml") == load_config()  # what `pixrun train` runs without a file
    assert load_config().train.budget == "12m" and Config().train.budget == ""  # a budget only when asked for


def test_quality_metrics_geneval_folder_and_diffusers_export_from_the_command_line(capsys, tmp_path):
    import json

    run = tmp_path / "r"
    assert run_cli(capsys, "train", f"run_dir={run}", *TINY_OVERRIDES, "train.steps=2")[0] == 0
    code, stdout, _ = run_cli(capsys, "eval", str(run), "--json", "--mse-t", "--num-images", "4")
    scores = json.loads(stdout)
    assert code == 0 and {"mse_t0.0-0.3", "mse_t0.3-0.6", "mse_t0.6-1.0", "overall"} <= set(scores)
    assert all(scores[k] > 0 for k in ("mse_t0.0-0.3", "mse_t0.3-0.6", "mse_t0.6-1.0"))

    metadata = tmp_path / "evaluation_metadata.jsonl"
    metadata.write_text('{"tag": "single_object", "include": [{"class": "circle", "count": 1}], '
                        '"prompt": "a photo of a circle"}\n')
    code, _, _ = run_cli(capsys, "geneval", str(run), str(metadata), "--out", str(tmp_path / "g"),
                         "--images-per-prompt", "2")
    assert code == 0 and len(list((tmp_path / "g" / "00000" / "samples").glob("*.png"))) == 2
    metadata.write_text("not json\n")
    code, _, err = run_cli(capsys, "geneval", str(run), str(metadata), "--out", str(tmp_path / "g2"))
    assert code == 2 and len(err.strip().splitlines()) == 1

    code, stdout, _ = run_cli(capsys, "export", str(run), str(tmp_path / "hf"))
    assert code == 0 and (tmp_path / "hf" / "model_index.json").is_file()
    code, _, err = run_cli(capsys, "export", str(run), str(tmp_path / "hf"))
    assert code == 2 and err.startswith("pixrun: error:")


def test_data_prepare_from_the_command_line(capsys, tmp_path):
    from tests.test_prepare import jpeg

    src = tmp_path / "images"
    src.mkdir()
    for i in range(3):
        (src / f"{i}.jpg").write_bytes(jpeg(i))
        (src / f"{i}.txt").write_text(f"picture {i}")
    (src / "broken.jpg").write_bytes(b"")
    (src / "broken.txt").write_text("nothing")
    code, stdout, _ = run_cli(capsys, "data", "prepare", str(src), str(tmp_path / "out"), "resolution=64",
                              "patch_size=16", "min_side=32", "processes=1")
    assert code == 0 and "kept 3 of 4" in stdout and "empty file" in stdout
    code, _, err = run_cli(capsys, "data", "prepare", str(src), str(tmp_path / "out2"), "quality=90")
    assert code == 2 and "unknown config key 'prepare.quality'" in err


def test_eval_of_a_run_on_prepared_shards_denoises_their_held_out_samples(capsys, tmp_path):
    import json

    from pixrun.data.prepare import PrepareOptions, prepare_dataset
    from pixrun.data.shards import read_held_out
    from pixrun.metrics import mse_by_t
    from pixrun.pipeline import load_run, load_run_config
    from tests.helpers import image_folder

    prepared = tmp_path / "prepared"
    prepare_dataset(image_folder(tmp_path / "images", 40), prepared,
                    PrepareOptions(resolution=32, patch_size=8, min_side=16, processes=1, heldout=6, heldout_share=0.2))
    run = tmp_path / "r"
    settings = ["data.source=shards", f"data.shards={prepared}", "data.num_workers=0", "data.partitions=1"]
    assert run_cli(capsys, "train", f"run_dir={run}", *TINY_OVERRIDES, *settings, "train.steps=2")[0] == 0
    code, stdout, _ = run_cli(capsys, "eval", str(run), "--json", "--mse-t", "--num-images", "4")
    held_out = read_held_out(str(prepared), 32, 4)
    expected = mse_by_t(load_run(run), held_out.floats(), held_out.captions, seed=load_run_config(run).metrics.seed)
    assert code == 0 and json.loads(stdout) == pytest.approx(expected)  # no compositional score: not the world
    code, _, err = run_cli(capsys, "eval", str(run))
    assert code == 2 and "data.source=shards" in err and "--mse-t" in err and len(err.strip().splitlines()) == 1
