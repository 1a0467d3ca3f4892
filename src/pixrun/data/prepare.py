"""Data preparation: images and captions -> WebDataset shards grouped by aspect-ratio bucket, plus an index.

    report = prepare_dataset("raw/", "data/prepared", PrepareOptions(resolution=512, patch_size=32))
    print(report.summary())

SRC is one of: a folder of images, each with a caption beside it (`a.jpg` + `a.txt`, or `a.json` with a
"caption" or "text" key); a folder of (or one) WebDataset tar shards as img2dataset writes them (`key.jpg` +
`key.txt` / `key.json`); a folder of (or one) Parquet files with an image-bytes column and a caption column.

Each image is converted to RGB (alpha composited on white, 16-bit scaled to 8-bit), resized and centre-cropped
to the nearest bucket and stored as JPEG. Images too small, too elongated or needing too much upscaling are
dropped, and so is every image whose perceptual hash equals an earlier image's. A few samples are held out of
training (`heldout`, for sample grids and metrics), and a sample of the training captions is written out for the
small text encoder's tokenizer; both are chosen by a hash of each input's name, so they are spread over the whole
input and do not depend on how the work is split. OUT receives:

    shards/WxH/NNNNNN.tar   one shard per input chunk and bucket: KEY.jpg, KEY.txt (caption), KEY.json
                            ({"source", "original_size"}), KEY.emb.npy (float16 text embedding, when asked for),
                            KEY.lat.npy (float16 latents of the stored image, with option vae=ID);
                            KEY = "WxH_NNNNNN_PLACE", PLACE being the sample's place in the shard
    heldout/WxH/NNNNNN.tar  the held-out samples, in shards of the same form (KEY = "heldout_WxH_NNNNNN_PLACE")
    captions.txt            up to `captions` training captions, one a line (whitespace collapsed)
    index.json              the training shards ("shards") with their bucket and sample count, the held-out ones
                            ("heldout"), captions.txt, and the identity of the text encoder that made the
                            embeddings and of the autoencoder that made the latents: what the loader reads
    report.json             kept and dropped, why, per bucket; every dropped item with its reason
    state/                  options.json and one record per finished chunk: a re-run skips finished chunks

Chunks are processed in parallel (worker processes decode, check, resize and encode) and written in chunk
order by the main process, which also removes duplicates and computes embeddings and latents, so the output
does not depend on the number of processes.
"""

import hashlib
import heapq
import io
import json
import multiprocessing
import os
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image, ImageOps
from webdataset import TarWriter

from pixrun.data.buckets import bucket_name, make_buckets, nearest_bucket
from pixrun.data.stream import (
    INDEX_FORMAT,
    INDEX_NAME,
    EmptyDatasetError,
    TarDamage,
    read_tar_samples,
    split_member_name,
)
from pixrun.latent import Autoencoder, LatentConfig
from pixrun.runtime import resolve_device

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "gif")
IMAGE_COLUMNS = ("image", "jpg", "img", "png", "image_bytes")
CAPTION_COLUMNS = ("caption", "text", "prompt", "txt")
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
CAPTIONS_NAME = "captions.txt"


@dataclass
class PrepareOptions:
    resolution: int = 512  # buckets hold about resolution² pixels
    patch_size: int = 32  # bucket sides are multiples of it
    min_ratio: float = 0.5  # bucket aspect ratios (width / height) span [min_ratio, max_ratio]
    max_ratio: float = 2.0
    max_elongation: float = 3.0  # drop images whose long side exceeds this many short sides: a crop would lose most
    min_side: int = 256  # drop images whose short side is smaller
    max_upscale: float = 4 / 3  # drop images that would need a larger scale factor to cover their bucket
    jpeg_quality: int = 95
    dedup: bool = True  # drop images whose perceptual hash equals an earlier one's
    processes: int = 0  # worker processes; 0 = one per CPU core
    chunk_size: int = 1000  # images per chunk of an image folder (a tar shard or a Parquet row group is one chunk)
    image_column: str | None = None  # Parquet: None = the first of IMAGE_COLUMNS present
    caption_column: str | None = None  # Parquet: None = the first of CAPTION_COLUMNS present
    embed_batch_size: int = 64  # captions per call of the embed function
    heldout: int = 256  # samples held out of training (sample grids, metrics): at most this many,
    heldout_share: float = 0.01  # and at most this share of the inputs, so a small folder trains on nearly all
    captions: int = 100_000  # training captions written to captions.txt (a sample when there are more)
    vae: str = ""  # a diffusers autoencoder (hub id or folder): store each image's latents; "" = none
    vae_subfolder: str = ""  # e.g. "vae" when `vae` names a pipeline folder or hub repo
    vae_dtype: str = "float32"  # the autoencoder's weights while encoding: train with the same latent.dtype
    vae_batch_size: int = 16  # images per call of the autoencoder

    def latent_config(self) -> LatentConfig:
        return LatentConfig(vae=self.vae, subfolder=self.vae_subfolder, dtype=self.vae_dtype)

    def validate(self) -> None:
        self.latent_config().validate()
        if self.vae_batch_size < 1:
            raise ValueError("prepare option vae_batch_size must be at least 1")
        if self.heldout < 0 or self.captions < 0:
            raise ValueError("prepare options heldout and captions must be >= 0")
        if not 0 <= self.heldout_share <= 1:
            raise ValueError(f"prepare option heldout_share must lie in [0, 1], got {self.heldout_share}")


@dataclass
class PrepareReport:
    kept: int
    dropped: dict[str, int]  # reason -> count
    buckets: dict[str, dict]  # "WxH" -> {"kept": n, "dropped": {reason: count}} (drops whose bucket is known)
    bad_items: list[dict] = field(default_factory=list)  # {"item", "reason", "detail", "bucket"}
    shards: int = 0  # training shards
    heldout: int = 0  # of the kept images, those held out of training

    def summary(self) -> str:
        total = self.kept + sum(self.dropped.values())
        lines = [f"kept {self.kept} of {total} images in {self.shards} shards, {self.heldout} of them held out"]
        lines += [f"  dropped {count}: {reason}" for reason, count in sorted(self.dropped.items())]
        for name, counts in sorted(self.buckets.items()):
            dropped = ", ".join(f"{n} {reason}" for reason, n in sorted(counts["dropped"].items()))
            lines.append(f"  bucket {name}: kept {counts['kept']}" + (f"; dropped {dropped}" if dropped else ""))
        return "\n".join(lines)


# Input: chunks of raw items.


@dataclass
class Task:
    number: int
    kind: str  # "folder" | "tar" | "parquet"
    path: str  # the tar or Parquet file; for a folder, its root
    items: list[str] = field(default_factory=list)  # folder: image paths relative to the root
    row_group: int = 0  # parquet


@dataclass
class RawItem:
    item: str  # where it came from, for the report
    image: bytes | None
    caption: str | None  # None: missing
    problem: str = ""  # set when a file exists but cannot be used


def list_tasks(src: Path, out: Path, options: PrepareOptions) -> list[Task]:
    """The chunks of work, in a fixed order; OUT is left out when it lies inside SRC."""
    out = out.resolve()
    files = [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file() and out not in p.resolve().parents)
    tars = [p for p in files if p.suffix == ".tar"]
    parquets = [p for p in files if p.suffix == ".parquet"]
    if tars:
        return [Task(n, "tar", str(p)) for n, p in enumerate(tars)]
    if parquets:
        groups = [(p, g) for p in parquets for g in range(pq.ParquetFile(p).num_row_groups)]
        return [Task(n, "parquet", str(p), row_group=g) for n, (p, g) in enumerate(groups)]
    images = [str(p.relative_to(src)) for p in files if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS]
    chunks = [images[i:i + options.chunk_size] for i in range(0, len(images), options.chunk_size)]
    return [Task(n, "folder", str(src), items=chunk) for n, chunk in enumerate(chunks)]


def tar_keys(path: str) -> Iterator[str]:
    """The sample keys of a tar from its member headers alone (tarfile seeks past the data); a damaged tar gives
    those before the damage."""
    previous = None
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                key = split_member_name(member.name)[0]
                if member.isreg() and key != previous:
                    previous = key
                    yield key
    except (tarfile.TarError, OSError):
        return


def item_names(task: Task) -> Iterator[str]:
    """The names read_items gives the task's items (as in the report), without reading any image."""
    if task.kind == "folder":
        yield from task.items
    elif task.kind == "tar":
        name = Path(task.path).name
        yield from (f"{name}:{key}" for key in tar_keys(task.path))
    else:
        metadata = pq.ParquetFile(task.path).metadata
        first_row = sum(metadata.row_group(g).num_rows for g in range(task.row_group))
        rows = range(first_row, first_row + metadata.row_group(task.row_group).num_rows)
        yield from (f"{Path(task.path).name}:row{number}" for number in rows)


def name_rank(name: str) -> bytes:
    return hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()


def choose_items(tasks: list[Task], options: PrepareOptions) -> tuple[set[str], set[str]]:
    """The inputs held out of training, and those whose captions go into captions.txt: the first and the next
    ones in an order set by a hash of their names, a spread-out sample that no split of the work changes."""
    total = 0

    def names() -> Iterator[str]:
        nonlocal total
        for task in tasks:
            for name in item_names(task):
                total += 1
                yield name

    ranked = heapq.nsmallest(options.heldout + options.captions, names(), key=name_rank)
    heldout = min(options.heldout, int(total * options.heldout_share))
    return set(ranked[:heldout]), set(ranked[heldout:heldout + options.captions])


def caption_from_json(data: bytes) -> tuple[str | None, str]:
    try:
        record = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        return None, "caption not UTF-8"
    except ValueError:
        return None, "caption JSON unreadable"
    caption = record.get("caption", record.get("text")) if isinstance(record, dict) else None
    return (caption, "") if isinstance(caption, str) else (None, "")


def caption_from_members(txt: bytes | None, json_data: bytes | None) -> tuple[str | None, str]:
    if txt is not None:
        try:
            return txt.decode("utf-8"), ""
        except UnicodeDecodeError:
            return None, "caption not UTF-8"
    if json_data is not None:
        return caption_from_json(json_data)
    return None, ""


def read_items(task: Task, options: PrepareOptions) -> Iterator[RawItem | TarDamage]:
    if task.kind == "folder":
        root = Path(task.path)
        for relative in task.items:
            path = root / relative
            txt, json_path = path.with_suffix(".txt"), path.with_suffix(".json")
            try:
                image = path.read_bytes()
                caption, problem = caption_from_members(
                    txt.read_bytes() if txt.is_file() else None, json_path.read_bytes() if json_path.is_file() else None
                )
            except OSError as error:
                image, caption, problem = None, None, f"unreadable file ({error.strerror})"
            yield RawItem(relative, image, caption, problem)
    elif task.kind == "tar":
        name = Path(task.path).name
        with open(task.path, "rb") as stream:
            for sample in read_tar_samples(stream, name):
                if isinstance(sample, TarDamage):
                    yield sample
                    continue
                members = sample.members
                image = next((members[e] for e in IMAGE_EXTENSIONS if e in members), None)
                caption, problem = caption_from_members(members.get("txt"), members.get("json"))
                yield RawItem(f"{name}:{sample.key}", image, caption, problem)
    else:
        table = pq.ParquetFile(task.path)
        names = table.schema_arrow.names
        image_column = options.image_column or next((c for c in IMAGE_COLUMNS if c in names), None)
        caption_column = options.caption_column or next((c for c in CAPTION_COLUMNS if c in names), None)
        if image_column not in names or caption_column not in names:
            raise ValueError(f"{task.path} has columns {names}: no image column or no caption column")
        rows = table.read_row_group(task.row_group, columns=[image_column, caption_column]).to_pylist()
        first_row = sum(table.metadata.row_group(g).num_rows for g in range(task.row_group))
        for number, row in enumerate(rows, start=first_row):
            image = row[image_column]
            if isinstance(image, dict):  # Hugging Face datasets' Image feature: {"bytes", "path"}
                image = image.get("bytes")
            caption = row[caption_column]
            if isinstance(caption, bytes):
                caption, problem = caption_from_members(caption, None)
            else:
                problem = ""
            yield RawItem(f"{Path(task.path).name}:row{number}", image, caption, problem)


# One item: checks, conversion, resize, encoding.


@dataclass
class Outcome:
    item: str
    reason: str = ""  # empty: kept
    detail: str = ""
    bucket: str | None = None
    jpeg: bytes = b""
    caption: str = ""
    hash: str = ""
    original_size: tuple[int, int] = (0, 0)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB of any mode: transparency composited on white, 16-bit scaled (not clipped) to 8-bit."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.float64) / 257.0
        image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def perceptual_hash(image: Image.Image) -> str:
    """Difference hash (dHash) along rows and columns of a 9×9 grey thumbnail: 144 bits, as hex."""
    gray = np.asarray(image.convert("L").resize((9, 9), Image.Resampling.BOX), dtype=np.int16)
    bits = np.concatenate([(gray[:, 1:] > gray[:, :-1]).ravel(), (gray[1:] > gray[:-1]).ravel()])
    return np.packbits(bits).tobytes().hex()


def process_item(raw: RawItem, options: PrepareOptions, buckets: list[tuple[int, int]]) -> Outcome:
    item = raw.item
    if raw.problem:
        return Outcome(item, raw.problem)
    if raw.caption is None or not raw.caption.strip():
        return Outcome(item, "missing caption")
    if raw.image is None:
        return Outcome(item, "missing image")
    if len(raw.image) == 0:
        return Outcome(item, "empty file")
    try:
        with Image.open(io.BytesIO(raw.image)) as opened:
            image = to_rgb(ImageOps.exif_transpose(opened))
    except Exception as error:  # noqa: BLE001 - untrusted files: PIL raises OSError, SyntaxError, ValueError, ...
        return Outcome(item, "unreadable image", f"{type(error).__name__}: {error}")
    width, height = image.size
    elongation = max(width, height) / min(width, height)
    if elongation > options.max_elongation:
        return Outcome(item, "too elongated", f"{width}x{height}: sides {elongation:.1f}:1 > {options.max_elongation}:1")
    if min(width, height) < options.min_side:
        return Outcome(item, "too small", f"{width}x{height}: short side under {options.min_side}")
    bucket = nearest_bucket(width, height, buckets)
    scale = max(bucket[0] / width, bucket[1] / height)
    if scale > options.max_upscale:
        return Outcome(
            item, "needs too much upscaling", f"{width}x{height} -> {bucket_name(bucket)}: x{scale:.2f}",
            bucket_name(bucket),
        )
    fitted = ImageOps.fit(image, bucket, Image.Resampling.LANCZOS)
    encoded = io.BytesIO()
    fitted.save(encoded, "JPEG", quality=options.jpeg_quality)
    return Outcome(
        item, bucket=bucket_name(bucket), jpeg=encoded.getvalue(), caption=raw.caption.strip(),
        hash=perceptual_hash(fitted), original_size=(width, height),
    )


def process_task(task: Task, options: PrepareOptions) -> list[Outcome]:
    buckets = make_buckets(options.resolution, options.patch_size, options.min_ratio, options.max_ratio)
    outcomes = []
    for raw in read_items(task, options):
        if isinstance(raw, TarDamage):
            outcomes.append(Outcome(raw.where, "corrupt tar member", raw.reason))
        else:
            outcomes.append(process_item(raw, options, buckets))
    return outcomes


# Output: shards, per-chunk records, index, report.


def write_atomically(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def npy_bytes(array) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asarray(array, dtype=np.float16), allow_pickle=False)
    return buffer.getvalue()


def stored_latents(autoencoder: Autoencoder, kept: list[Outcome], batch_size: int) -> list[np.ndarray]:
    """Each sample's latents, float16, from its stored JPEG as training reads it (decoded, x / 127.5 - 1): the
    latents training would compute from the same sample. A shard's images share a bucket, so they batch."""
    latents = []
    for start in range(0, len(kept), batch_size):
        pixels = []
        for outcome in kept[start:start + batch_size]:
            with Image.open(io.BytesIO(outcome.jpeg)) as image:
                pixels.append(np.array(image.convert("RGB")))
        images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 127.5 - 1
        latents += list(autoencoder.encode(images).to(torch.float16).cpu().numpy())
    return latents


def write_shard(
    relative: str,
    out: Path,
    prefix: str,
    kept: list[Outcome],
    embed: Callable[[list[str]], list] | None,
    options: PrepareOptions,
    autoencoder: Autoencoder | None,
) -> None:
    embeddings = []
    if embed is not None:
        for start in range(0, len(kept), options.embed_batch_size):
            embeddings += embed([o.caption for o in kept[start:start + options.embed_batch_size]])
    latents = stored_latents(autoencoder, kept, options.vae_batch_size) if autoencoder is not None else []
    path = out / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with TarWriter(str(temporary), encoder=False, mtime=0) as writer:
        for place, outcome in enumerate(kept):
            sample = {
                "__key__": f"{prefix}_{place:06d}",
                "jpg": outcome.jpeg,
                "txt": outcome.caption.encode("utf-8"),
                "json": json.dumps({"source": outcome.item, "original_size": list(outcome.original_size)}).encode(),
            }
            if embed is not None:
                sample["emb.npy"] = npy_bytes(embeddings[place])
            if autoencoder is not None:
                sample["lat.npy"] = npy_bytes(latents[place])
            writer.write(sample)
    os.replace(temporary, path)


def finish_chunk(
    task: Task,
    outcomes: list[Outcome],
    out: Path,
    seen_hashes: set[str],
    options: PrepareOptions,
    embed: Callable[[list[str]], list] | None,
    chosen: tuple[set[str], set[str]],
    autoencoder: Autoencoder | None = None,
) -> dict:
    """Remove duplicates, write the chunk's shards (one per bucket, training and held-out apart) and return its
    record. `chosen`: the items to hold out and those whose captions to record (choose_items)."""
    heldout_items, caption_items = chosen
    kept_by_bucket: dict[tuple[bool, str], list[Outcome]] = {}  # (held out, bucket) -> samples
    dropped = []
    for outcome in outcomes:
        if not outcome.reason and options.dedup and outcome.hash in seen_hashes:
            outcome.reason, outcome.detail = "duplicate", f"perceptual hash {outcome.hash} seen before"
        if outcome.reason:
            dropped.append({"item": outcome.item, "reason": outcome.reason, "detail": outcome.detail,
                            "bucket": outcome.bucket})
            continue
        seen_hashes.add(outcome.hash)  # held-out images too: a copy of one must not reach training
        kept_by_bucket.setdefault((outcome.item in heldout_items, outcome.bucket), []).append(outcome)
    record = {"chunk": task.number, "shards": [], "heldout": [], "captions": [], "dropped": dropped}
    for (held_out, bucket), kept in sorted(kept_by_bucket.items()):
        folder, prefix = ("heldout", "heldout_") if held_out else ("shards", "")
        relative = f"{folder}/{bucket}/{task.number:06d}.tar"
        write_shard(relative, out, f"{prefix}{bucket}_{task.number:06d}", kept, embed, options, autoencoder)
        record["heldout" if held_out else "shards"].append({"path": relative, "bucket": bucket, "count": len(kept)})
        if not held_out:
            record["captions"] += [" ".join(o.caption.split()) for o in kept if o.item in caption_items]
    record["hashes"] = [o.hash for kept in kept_by_bucket.values() for o in kept]
    return record


def build_report(records: list[dict]) -> PrepareReport:
    dropped = Counter()
    buckets: dict[str, dict] = {}
    bad_items = []
    for record in records:
        for shard in record["shards"] + record["heldout"]:
            buckets.setdefault(shard["bucket"], {"kept": 0, "dropped": {}})["kept"] += shard["count"]
        for drop in record["dropped"]:
            dropped[drop["reason"]] += 1
            bad_items.append(drop)
            if drop["bucket"]:
                counts = buckets.setdefault(drop["bucket"], {"kept": 0, "dropped": {}})["dropped"]
                counts[drop["reason"]] = counts.get(drop["reason"], 0) + 1
    kept = sum(b["kept"] for b in buckets.values())
    shards = sum(len(r["shards"]) for r in records)
    heldout = sum(shard["count"] for r in records for shard in r["heldout"])
    return PrepareReport(kept, dict(dropped), buckets, bad_items, shards, heldout)


def prepare_dataset(
    src: str | Path,
    out: str | Path,
    options: PrepareOptions | None = None,
    embed: Callable[[list[str]], list] | None = None,
    text_encoder: dict | None = None,
) -> PrepareReport:
    """Prepare SRC into shards in OUT (see the module docstring); resumes a run that stopped.

    embed, when given, maps a list of captions to one float16 array (tokens, dim) each, stored with the sample;
    text_encoder, required with it, is the identity of the encoder behind it (TextTower.identity()), recorded in
    the index so that training with another encoder is refused. With options.vae, each stored image's latents are
    stored too, and the autoencoder's identity (Autoencoder.identity()) recorded likewise.
    """
    src, out, options = Path(src), Path(out), options or PrepareOptions()
    options.validate()
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist")
    if (embed is None) != (text_encoder is None):
        raise ValueError("embed and text_encoder go together: the index records which encoder made the embeddings")
    tasks = list_tasks(src, out, options)
    if not tasks:
        raise EmptyDatasetError(f"{src} holds no images, tar shards or Parquet files")
    autoencoder, latent_record = None, {}
    if options.vae:
        autoencoder = Autoencoder.from_config(options.latent_config()).to(resolve_device("auto"))
        if options.patch_size % autoencoder.factor:
            raise ValueError(f"prepare option patch_size ({options.patch_size}) must be a multiple of the autoencoder's "
                             f"factor ({autoencoder.factor}): in latent space it is factor x the denoiser's patch size")
        latent_record = {"autoencoder": autoencoder.identity()}
    state_dir = out / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    listing = hashlib.sha256(json.dumps([asdict(t) for t in tasks]).encode()).hexdigest()
    settings = {"source": str(src.resolve()), "listing": listing, "options": asdict(options),
                "embeddings": embed is not None, "text_encoder": text_encoder, **latent_record}
    settings_path = state_dir / "options.json"
    if settings_path.exists() and json.loads(settings_path.read_text()) != settings:
        raise ValueError(f"{out} was prepared from other inputs or options; prepare into a new folder")
    write_atomically(settings_path, json.dumps(settings, indent=1))

    records = {}
    for path in sorted(state_dir.glob("chunk_*.json")):
        record = json.loads(path.read_text())
        records[record["chunk"]] = record
    seen_hashes = {h for record in records.values() for h in record["hashes"]}
    pending = [task for task in tasks if task.number not in records]
    chosen = choose_items(tasks, options) if pending else (set(), set())
    work = partial(process_task, options=options)
    processes = min(options.processes or os.cpu_count() or 1, len(pending))
    # spawn, not fork: the parent may hold CUDA (the embed function's text tower) or threads.
    with multiprocessing.get_context("spawn").Pool(processes) if processes > 1 else nullcontext() as pool:
        results = pool.imap(work, pending) if processes > 1 else map(work, pending)
        for task, outcomes in zip(pending, results):
            record = finish_chunk(task, outcomes, out, seen_hashes, options, embed, chosen, autoencoder)
            write_atomically(state_dir / f"chunk_{task.number:06d}.json", json.dumps(record))
            records[task.number] = record

    ordered = [records[n] for n in sorted(records)]
    shards = [shard for record in ordered for shard in record["shards"]]
    captions = [caption for record in ordered for caption in record["captions"]]
    write_atomically(out / CAPTIONS_NAME, "".join(f"{caption}\n" for caption in captions))
    index = {
        "format": INDEX_FORMAT, "resolution": options.resolution, "patch_size": options.patch_size,
        "embeddings": embed is not None, "text_encoder": text_encoder, "samples": sum(s["count"] for s in shards),
        "shards": shards, "heldout": [shard for record in ordered for shard in record["heldout"]],
        "captions": CAPTIONS_NAME, **latent_record,
    }
    write_atomically(out / INDEX_NAME, json.dumps(index, indent=1))
    report = build_report(ordered)
    write_atomically(out / "report.json", json.dumps(asdict(report), indent=1))
    return report
