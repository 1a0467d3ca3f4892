"""RunLogger's W&B side, in W&B's offline mode: what it logs is read back from the run's .wandb file."""

import json
import struct
import sys

import numpy as np
import pytest
from PIL import Image

from pixrun.errors import ConfigError
from pixrun.logger import WANDB_RUN_FILE, LogConfig, RunLogger

BLOCK = 32768  # the .wandb file is a LevelDB-style log: 32 KiB blocks of records with a 7-byte header


def wandb_records(path):
    """The protobuf records of an offline run's .wandb file, in order."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, parts = 7, b""  # after the file header: ":W&B", magic (2 bytes), version (1 byte)
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])  # crc32c, length, FULL/FIRST/MIDDLE/LAST
        if left < 7 or (kind == 0 and length == 0):  # a block's zero padding
            pos += left
            continue
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def read_offline_run(run_folder):
    """(run record, {step: {key: value}}) of one offline run folder."""
    (file,) = run_folder.glob("run-*.wandb")
    run, history = None, {}
    for record in wandb_records(file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[row.pop("_step")] = row
    return run, history


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    return LogConfig(wandb=True, wandb_mode="offline", wandb_project="pixrun-test")


def test_wandb_gets_the_scalars_records_and_grids_and_a_resume_continues_its_run(offline, tmp_path):
    import wandb

    run_dir = tmp_path / "my-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("train:\n  steps: 4\n")
    grid = run_dir / "grid.png"
    Image.fromarray(np.full((6, 10, 3), 200, np.uint8)).save(grid)

    logger = RunLogger(run_dir, total_steps=4, start_step=0, config=offline)
    logger.image("samples/ema", grid, 0)
    logger.step(0, {"loss": 0.5, "lr": 1e-3}, images=4)
    logger.step(1, {}, images=4)  # between log steps: nothing logged
    logger.record("quality", {"fid": 12.5, "mse_t0.5": 0.25}, 2)
    logger.step(2, {"loss": 0.125, "lr": 2e-3}, images=4)
    logger.close()
    first_id = json.loads((run_dir / WANDB_RUN_FILE).read_text())["id"]

    logger = RunLogger(run_dir, total_steps=4, start_step=3, config=offline)
    logger.step(3, {"loss": 0.0625, "lr": 3e-3}, images=4)
    logger.close()
    wandb.teardown()  # finish() may return before W&B's service has written the last records out

    first, resumed = sorted((run_dir / "wandb").glob("offline-run-*"))
    run, history = read_offline_run(first)
    assert (run.run_id, run.display_name, run.project) == (first_id, "my-run", "pixrun-test")
    assert {item.key: json.loads(item.value_json) for item in run.config.update}["train"] == {"steps": 4}
    assert sorted(history) == [0, 1, 2, 3]
    assert history[0]["samples/ema/_type"] == "image-file"
    assert (history[0]["samples/ema/width"], history[0]["samples/ema/height"]) == (10, 6)
    assert (first / "files" / history[0]["samples/ema/path"]).is_file()
    assert (history[1]["train/loss"], history[1]["train/lr"]) == (0.5, 1e-3)
    assert history[1]["train/images_per_s"] > 0
    assert (history[2]["quality/fid"], history[2]["quality/mse_t0.5"]) == (12.5, 0.25)
    assert history[3]["train/loss"] == 0.125 and "quality/fid" not in history[3]

    run, history = read_offline_run(resumed)
    assert run.run_id == first_id
    assert sorted(history) == [4] and history[4]["train/loss"] == 0.0625
    # TensorBoard and metrics.jsonl as before
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 3, 4]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_a_run_from_step_zero_starts_a_new_wandb_run_and_tensorboard_can_be_off(offline, tmp_path):
    (tmp_path / WANDB_RUN_FILE).write_text(json.dumps({"id": "oldrun01"}))
    config = LogConfig(tensorboard=False, wandb=True, wandb_mode="disabled")
    logger = RunLogger(tmp_path, total_steps=2, start_step=0, config=config)
    logger.step(0, {"loss": 1.0}, images=2)
    logger.close()
    assert json.loads((tmp_path / WANDB_RUN_FILE).read_text())["id"] != "oldrun01"
    assert not (tmp_path / "tensorboard").exists()


def test_wandb_missing_or_a_bad_mode_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ConfigError, match=r"^log.wandb needs wandb, which is not installed: pip install") as error:
        RunLogger(tmp_path, total_steps=2, start_step=0, config=LogConfig(tensorboard=False, wandb=True))
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="log.wandb_mode must be one of online, offline, disabled"):
        LogConfig(wandb_mode="cloud").validate()
    LogConfig().validate()
