"""Images per second one loader worker decodes, at 256 and 512 px, on synthetic JPEG shards made on the fly.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/loader_throughput.py "2-core CPU, shared" \\
        > benchmarks/loader_throughput_cpu.json

Two figures per resolution, both through ShardStream (tar reading, JPEG decoding, uint8 batches):
`in_process` does a worker's work in this process (num_workers=0), the rate one worker can reach; `one_worker`
runs it in one DataLoader worker process and adds the hand-over of each batch to the training process. Both are
timed on a running stream, after its first batch (a stage's stream starts its workers once). The
pictures are smooth random fields with fine noise on top, a JPEG size (q 95) close to photographs'. Prints one
JSON object; the argument describes the machine.
"""

import io
import itertools
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from webdataset import TarWriter

from pixrun.data.stream import INDEX_FORMAT, Batch, ShardStream

IMAGES_PER_SHARD, SHARDS, BATCH_SIZE, ROUNDS = 64, 4, 16, 3


def synthetic_jpeg(rng: np.random.Generator, size: int) -> bytes:
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((size, size), Image.Resampling.BICUBIC), dtype=np.int16)
    pixels = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


def write_shards(root: Path, size: int) -> list[int]:
    """Synthetic shards of one square bucket in root; the JPEG sizes."""
    rng = np.random.default_rng(size)
    bucket = f"{size}x{size}"
    shards, images = [], []
    for number in range(SHARDS):
        path = f"shards/{bucket}/{number:06d}.tar"
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        with TarWriter(str(root / path), encoder=False) as writer:
            for place in range(IMAGES_PER_SHARD):
                image = synthetic_jpeg(rng, size)
                images.append(len(image))
                key = f"{bucket}_{number:06d}_{place:06d}"
                writer.write({"__key__": key, "jpg": image, "txt": b"a synthetic picture", "json": b"{}"})
        shards.append({"path": path, "bucket": bucket, "count": IMAGES_PER_SHARD})
    index = {"format": INDEX_FORMAT, "embeddings": False, "samples": SHARDS * IMAGES_PER_SHARD, "shards": shards}
    (root / "index.json").write_text(json.dumps(index))
    return images


def best_rate(run, images: int) -> float:
    """Images per second of the fastest of ROUNDS runs (the one least disturbed by other jobs)."""
    seconds = []
    for _ in range(ROUNDS):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    return round(images / min(seconds), 1)


def take(batches: Iterator[Batch], count: int) -> None:
    for _ in itertools.islice(batches, count):
        pass


def measure(size: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        jpeg_sizes = write_shards(root, size)
        result = {"mean_jpeg_kb": round(sum(jpeg_sizes) / len(jpeg_sizes) / 1024, 1)}
        for name, workers in (("in_process", 0), ("one_worker", 1)):
            stream = ShardStream(str(root), BATCH_SIZE, num_workers=workers, partitions=SHARDS)
            batches = stream.batches()
            next(batches)  # the worker started: the stream runs endlessly, timed steady, as in training
            result[f"{name}_images_per_s"] = best_rate(partial(take, batches, len(stream)), len(stream) * BATCH_SIZE)
            batches.close()
        return result


def main(args: list[str]) -> None:
    torch.set_num_threads(1)
    result = {
        "machine": args[0] if args else "",
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pillow": PIL.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_before": [round(x, 2) for x in os.getloadavg()],  # other jobs on the same cores
        "images_measured": SHARDS * IMAGES_PER_SHARD,
        "batch_size": BATCH_SIZE,
        "resolutions": {str(size): measure(size) for size in (256, 512)},
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
