"""Loss terms beside the flow loss: LPIPS and P-DINO on x̂₀, REPA on a block's tokens.

Each lives in its own module with its own config; this file holds what they share: loading pretrained weights
(a local file or a URL), the one-line error when they are absent, and the t-gate.
"""

from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors.torch import load_file

from pixrun.errors import WeightsMissingError


def load_weights(source: str, what: str, config_key: str, random_key: str) -> dict[str, torch.Tensor]:
    """A state dict from a local .safetensors / .pth file, or from a URL of one (kept in torch.hub's cache)."""
    demo = f"(or {random_key}=true for a meaningless CPU demo)"
    if source.startswith(("http://", "https://")):
        path = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(source).path).name
        if not path.is_file():
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(source, str(path), progress=False)
            except OSError as e:  # no DNS, refused, HTTP errors: all OSErrors
                raise WeightsMissingError(
                    f"could not download {what} from {source} ({e.__class__.__name__}): fetch it on a machine with "
                    f"network and put it at {path}, or anywhere and set {config_key}=/path/to/file {demo}"
                ) from None
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise WeightsMissingError(
                f"{what} not found at {path}: download it (docs/losses.md) and put it there, or set {config_key} "
                f"to where it is {demo}"
            )
    if path.suffix == ".safetensors":
        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def gated_mean(per_sample: torch.Tensor, t: torch.Tensor, max_t: float) -> torch.Tensor:
    """Batch mean of a per-sample loss, counted only where t <= max_t (t = 1 is pure noise); others count as 0."""
    return (per_sample * (t <= max_t).to(per_sample.dtype)).mean()
