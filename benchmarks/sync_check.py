"""Does an ordinary training step run without a host synchronisation on CUDA?

Warms a config up for a few steps, then runs one step that is not a logging step under
`torch.cuda.set_sync_debug_mode("error")`, which raises on any call that makes the host wait for the device
(.item(), .cpu(), nonzero, a blocking copy ...). Prints one JSON line: {"sync_free": true} or the error and where.
CPU runs are checked by tests/test_train.py::test_an_ordinary_step_never_reads_the_device instead.

    python benchmarks/sync_check.py configs/prx-small-pixel.yaml train.batch_size=8 [more overrides]
"""

import json
import sys
import tempfile
import traceback

import torch

from pixrun.config import load_config
from pixrun.train import Trainer


def main(argv: list[str]) -> dict:
    if not torch.cuda.is_available():
        return {"sync_free": None, "reason": "no CUDA device"}
    path = argv[0] if argv and "=" not in argv[0] else None
    overrides = argv[1:] if path else argv
    with tempfile.TemporaryDirectory() as run_dir:
        config = load_config(path, [*overrides, f"run_dir={run_dir}", "train.log_every=1000000"])
        trainer = Trainer(config)
        try:
            for step in range(3):
                trainer.step(step)
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                trainer.step(3)
                result = {"sync_free": True}
            except RuntimeError as error:
                result = {"sync_free": False, "error": str(error).splitlines()[0],
                          "where": traceback.format_exc().splitlines()[-8:]}
            finally:
                torch.cuda.set_sync_debug_mode("default")
        finally:
            trainer.close()
    return {**result, "config": path, "overrides": overrides, "device": torch.cuda.get_device_name()}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
