"""Why the strict evaluator fails a run's images: for each task, how many images pass, and of the others whether
no object was found, an object was not one flat colour, an object's outline matched no kind's template well enough
(template IoU below pixrun.evaluate.MIN_SHAPE_IOU, or too close to a second kind), or every object was named and
the prompt was still not met (wrong kind, colour, count or place). Prints one JSON object.

    .venv/bin/python benchmarks/eval_misses.py RUN [--cfg 2] [--steps 40]

The images are the evaluator's (its prompts and seeds), so each task's passed / images is `pixrun eval`'s score.
"""

import argparse
import collections
import dataclasses
import json
from pathlib import Path

import numpy as np

from pixrun.evaluate import MIN_SHAPE_IOU, detect, evaluation_images, judge
from pixrun.pipeline import build_world, load_run, load_run_config


def miss(detections, passed: bool) -> str:
    if passed:
        return "passed"
    if not detections:
        return "no_object"
    if any(d.score == 0 for d in detections):
        return "not_flat"
    if any(d.kind == "unknown" for d in detections):
        return "outline_unnamed"
    return "named_but_wrong"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the run's)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the run's)")
    args = parser.parse_args()

    config = load_run_config(args.run)
    world = build_world(config)
    pipeline = load_run(args.run)
    changes = {"cfg_scale": args.cfg, "steps": args.steps}
    pipeline.sample = dataclasses.replace(pipeline.sample, **{k: v for k, v in changes.items() if v is not None})
    specs, images = evaluation_images(pipeline, world, config.eval)

    counts: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    unnamed_ious: list[float] = []
    for spec, image in ((spec, image) for spec, spec_images in zip(specs, images) for image in spec_images):
        detections = detect(image, world)
        reason = miss(detections, judge(spec, detections))
        counts[spec.task + (" (held-out pair)" if spec.heldout else "")][reason] += 1
        if reason == "outline_unnamed":
            unnamed_ious += [d.score for d in detections if d.kind == "unknown" and d.score > 0]
    quantiles = np.quantile(unnamed_ious, [0.1, 0.5, 0.9]).round(3).tolist() if unnamed_ious else []
    print(json.dumps({
        "run": str(args.run), "cfg_scale": pipeline.sample.cfg_scale, "steps": pipeline.sample.steps,
        "min_shape_iou": MIN_SHAPE_IOU, "images": sum(map(len, images)),
        "by_task": {task: dict(c) for task, c in counts.items()},
        "all": dict(sum(counts.values(), collections.Counter())),
        "unnamed_outline_iou_q10_q50_q90": quantiles,
    }, indent=1))


if __name__ == "__main__":
    main()
