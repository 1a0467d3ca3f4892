"""Images for GenEval's own prompts, in the folder layout its scorer reads, to score a model with the official
tool (djghosh13/geneval, evaluation/evaluate_images.py) on a machine that has its detector:

    OUT/00000/metadata.jsonl      line 0 of evaluation_metadata.jsonl (one JSON object)
    OUT/00000/samples/0000.png    images_per_prompt images (GenEval's protocol: 4)
    OUT/00000/samples/0001.png
    OUT/00001/...

The scorer reads every numbered folder, its metadata.jsonl, and every samples/<digits>.png; grid.png is optional
and not written.
"""

import json
from pathlib import Path

from PIL import Image

from pixrun.metrics import generate_batches
from pixrun.pipeline import Pipeline, to_uint8


def read_geneval_metadata(path: str | Path) -> list[dict]:
    """One JSON object per non-empty line, each with at least "tag" and "prompt" (and "include", "exclude")."""
    entries = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if not isinstance(entry, dict) or "prompt" not in entry or "tag" not in entry:
            raise ValueError(f"{path}:{number} is not a GenEval prompt (a JSON object with 'tag' and 'prompt')")
        entries.append(entry)
    return entries


def export_geneval(
    pipeline: Pipeline,
    metadata_path: str | Path,
    out_dir: str | Path,
    images_per_prompt: int = 4,
    seed: int = 0,
    batch_size: int = 32,
) -> int:
    """Generate and write the images; returns the number of prompts. Images of all prompts are batched
    together; image k of prompt n starts from the noise of seed `seed + n * images_per_prompt + k`, so the
    output does not depend on batch_size."""
    entries = read_geneval_metadata(metadata_path)
    out_dir = Path(out_dir)
    for index, entry in enumerate(entries):
        folder = out_dir / f"{index:05d}"
        (folder / "samples").mkdir(parents=True, exist_ok=True)
        (folder / "metadata.jsonl").write_text(json.dumps(entry) + "\n")
    jobs = [(index, k) for index in range(len(entries)) for k in range(images_per_prompt)]
    batches = generate_batches(pipeline, [entries[index]["prompt"] for index, _ in jobs], seed, batch_size)
    images = (image for batch in batches for image in to_uint8(batch))  # one batch in memory at a time
    for (index, k), image in zip(jobs, images):
        Image.fromarray(image).save(out_dir / f"{index:05d}" / "samples" / f"{k:04d}.png")
    return len(entries)
