"""Embeddings of a frozen text tower, computed once per caption and kept on disk.

    CACHE_DIR/{tower identity hash}/
        index-{writer}.json              the tower's identity, this writer's shards, the shard of each caption
        {writer}-00000.safetensors       one tensor per caption, (tokens, dim) without padding, named by its hash

A frozen encoder's output depends only on the caption and the tower's identity (source, class, dtype, token
budget, cleaning, a fingerprint of the weights), so the folder is keyed by that identity and a different encoder
or setting never reads another's embeddings. New embeddings are held in memory and written as a new shard every
`shard_size` captions and on `flush()`. Each process writes only its own files (`writer`, e.g. its rank) and
reads everyone's that existed when it opened the cache.
"""

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pixrun.text import TextTower, pad_states


def caption_key(caption: str) -> str:
    return hashlib.sha256(caption.encode()).hexdigest()[:32]


class TextCache:
    def __init__(self, root: str | Path, tower: TextTower, shard_size: int = 4096, writer: str = "0"):
        if tower.trainable:
            raise ValueError("only a frozen text encoder can be cached: a trained one changes every step")
        self.tower = tower
        identity = tower.identity()
        self.dir = Path(root) / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.shard_size = shard_size
        self.writer = writer
        self.index_path = self.dir / f"index-{writer}.json"
        self.index = {"identity": identity, "shards": [], "entries": {}}
        if self.index_path.is_file():
            self.index = json.loads(self.index_path.read_text())
        self.location: dict[str, str] = {}  # caption key -> shard file, from every writer's index
        for path in sorted(self.dir.glob("index-*.json")):
            index = json.loads(path.read_text())
            self.location.update({k: index["shards"][n] for k, n in index["entries"].items()})
        self.pending: dict[str, torch.Tensor] = {}
        self.open_shards = {}

    def __call__(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The tower's (txt, mask) for `captions`, encoding only those never seen; the empty caption included."""
        keys = [caption_key(c) for c in captions]
        missing = list(dict.fromkeys(c for c, k in zip(captions, keys) if not self._has(k)))
        if missing:
            txt, mask = self.tower(missing)
            for caption, emb, m in zip(missing, txt, mask):
                kept = emb[m].cpu()
                compact = kept.bfloat16()  # half the disk, and exact for a bf16 encoder's outputs
                self.pending[caption_key(caption)] = compact if torch.equal(compact.float(), kept) else kept
            if len(self.pending) >= self.shard_size:
                self.flush()
        return self._batch([self._get(k) for k in keys])

    def flush(self) -> None:
        """Write the embeddings held in memory as one new shard, then the index, each atomically."""
        if not self.pending:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        shard = len(self.index["shards"])
        name = f"{self.writer}-{shard:05d}.safetensors"
        tmp = self.dir / f".tmp-{name}"
        save_file({k: v.contiguous() for k, v in self.pending.items()}, tmp)
        os.replace(tmp, self.dir / name)
        self.index["shards"].append(name)
        self.index["entries"].update({k: shard for k in self.pending})
        tmp_index = self.dir / f".tmp-{self.index_path.name}"
        tmp_index.write_text(json.dumps(self.index))
        os.replace(tmp_index, self.index_path)
        self.location.update({k: name for k in self.pending})
        self.pending = {}

    def _has(self, key: str) -> bool:
        return key in self.pending or key in self.location

    def _get(self, key: str) -> torch.Tensor:
        if key in self.pending:
            return self.pending[key]
        name = self.location[key]
        if name not in self.open_shards:
            self.open_shards[name] = safe_open(self.dir / name, framework="pt")
        return self.open_shards[name].get_tensor(key)

    def _batch(self, embeddings: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pad to the longest (at least one token), as the tower does, on the tower's device."""
        device = next(self.tower.encoder.parameters()).device
        txt, mask = pad_states([e.float() for e in embeddings])
        return txt.to(device), mask.to(device)
