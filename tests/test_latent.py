import io
import itertools
import json
import shutil
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from pixrun.data.prepare import PrepareOptions, prepare_dataset
from pixrun.data.shards import ShardSource
from pixrun.data.stream import PlanError, ShardStream, TarSample, decode_sample, read_tar_samples
from pixrun.errors import ConfigError
from pixrun.latent import Autoencoder, LatentConfig
from tests.helpers import image_folder
from tests.test_stream import without_member

diffusers = pytest.importorskip("diffusers")

# Flux's VAE stores these; a tiny one with the same makes a wrong sign or order show.
SHIFT, SCALE = 0.1159, 0.3611
DC_SCALE = 0.41407
OPTIONS = PrepareOptions(resolution=32, patch_size=8, min_side=16, processes=1, chunk_size=4, heldout_share=0.25)


def tiny_kl(path, seed=0, shift=SHIFT):
    """An AutoencoderKL of random weights: 4 latent channels, 2x (two blocks)."""
    torch.manual_seed(seed)
    diffusers.AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        sample_size=32, scaling_factor=SCALE, shift_factor=shift,
    ).save_pretrained(path)
    return path


def tiny_dc(path, seed=0):
    """An AutoencoderDC of random weights: 4 latent channels, 2x, no attention."""
    torch.manual_seed(seed)
    diffusers.AutoencoderDC(
        latent_channels=4, attention_head_dim=4, encoder_block_types="ResBlock", decoder_block_types="ResBlock",
        encoder_block_out_channels=(8, 16), decoder_block_out_channels=(8, 16), encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1), encoder_qkv_multiscales=((), ()), decoder_qkv_multiscales=((), ()),
        scaling_factor=DC_SCALE,
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vaes(tmp_path_factory):
    root = tmp_path_factory.mktemp("vaes")
    return SimpleNamespace(kl=tiny_kl(root / "kl"), dc=tiny_dc(root / "pipeline" / "vae"), pipeline=root / "pipeline")


def images(seed=0, size=(2, 3, 32, 48)):
    return torch.rand(size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_kl_and_dc_load_by_path_with_their_format(vaes):
    kl = Autoencoder.from_config(LatentConfig(vae=str(vaes.kl)))
    dc = Autoencoder.from_config(LatentConfig(vae=str(vaes.pipeline), subfolder="vae"))  # a pipeline folder
    assert (type(kl.vae).__name__, kl.channels, kl.factor, kl.shift, kl.scale) == ("AutoencoderKL", 4, 2, SHIFT, SCALE)
    assert (type(dc.vae).__name__, dc.channels, dc.factor, dc.shift, dc.scale) == ("AutoencoderDC", 4, 2, 0.0, DC_SCALE)
    for autoencoder in (kl, dc):
        latents = autoencoder.encode(images())
        assert latents.shape == (2, 4, 16, 24) and latents.dtype == torch.float32
        assert autoencoder.decode(latents).shape == (2, 3, 32, 48)
    with pytest.raises(ConfigError, match="set latent.subfolder"):
        Autoencoder.from_config(LatentConfig(vae=str(vaes.pipeline)))


def test_a_kl_vae_without_shift_is_unshifted(tmp_path):
    assert Autoencoder.from_config(LatentConfig(vae=str(tiny_kl(tmp_path / "kl", shift=None)))).shift == 0.0


@pytest.mark.parametrize("kind", ["kl", "dc"])
def test_encode_is_deterministic_and_scaled_as_prx_pipeline_unscales(vaes, kind):
    path = vaes.kl if kind == "kl" else vaes.dc
    autoencoder = Autoencoder.from_config(LatentConfig(vae=str(path)))
    x = images(1)
    latents = autoencoder.encode(x)
    assert torch.equal(latents, autoencoder.encode(x))  # the posterior's mode, not a sample
    # By hand, with diffusers alone.
    vae = getattr(diffusers, "AutoencoderKL" if kind == "kl" else "AutoencoderDC").from_pretrained(path)
    shift, scale = (SHIFT, SCALE) if kind == "kl" else (0.0, DC_SCALE)
    with torch.no_grad():
        out = vae.encode(x)
        z = out.latent_dist.mode() if kind == "kl" else out.latent
        torch.testing.assert_close(latents, (z - shift) * scale)
        decoded = vae.decode(latents / scale + shift).sample  # what PRXPipeline does with its latents
    torch.testing.assert_close(autoencoder.decode(latents), decoded)


def test_gradient_reaches_the_latents_through_decode_but_not_the_vae(vaes):
    autoencoder = Autoencoder.from_config(LatentConfig(vae=str(vaes.kl)))
    autoencoder.train()
    assert not autoencoder.vae.training  # frozen: no dropout, whatever the loop asks
    latents = autoencoder.encode(images()).requires_grad_()
    autoencoder.decode(latents).square().mean().backward()
    assert latents.grad is not None and latents.grad.abs().sum() > 0 and latents.grad.isfinite().all()
    assert all(not p.requires_grad and p.grad is None for p in autoencoder.parameters())


def test_bfloat16_weights_give_float32_latents_and_images(vaes):
    autoencoder = Autoencoder.from_config(LatentConfig(vae=str(vaes.kl), dtype="bfloat16"))
    assert autoencoder.dtype == torch.bfloat16
    latents = autoencoder.encode(images()).requires_grad_()
    decoded = autoencoder.decode(latents)
    assert latents.dtype == decoded.dtype == torch.float32
    decoded.sum().backward()
    assert latents.grad.abs().sum() > 0
    assert autoencoder.identity()["dtype"] == "bfloat16"


def test_identity_matches_a_copy_and_tells_other_weights_apart(vaes, tmp_path):
    identity = lambda path, **kw: Autoencoder.from_config(LatentConfig(vae=str(path), **kw)).identity()
    original = identity(vaes.kl)
    copy = identity(shutil.copytree(vaes.kl, tmp_path / "copy"))
    assert copy["vae"] != original["vae"] and {**copy, "vae": original["vae"]} == original
    assert identity(tiny_kl(tmp_path / "other", seed=1))["weights"] != original["weights"]
    assert identity(vaes.pipeline, subfolder="vae")["class"] == "AutoencoderDC"


def test_config_errors_are_one_line(vaes, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="latent.dtype"):
        LatentConfig(vae="x", dtype="float16").validate()
    with pytest.raises(ValueError, match="latent.subfolder is set"):
        LatentConfig(subfolder="vae").validate()
    assert not LatentConfig().enabled and LatentConfig(vae="x").enabled
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ConfigError, match="is a 'UNet2DModel'; pixrun takes AutoencoderKL or AutoencoderDC"):
        Autoencoder.from_config(LatentConfig(vae=str(tmp_path / "unet")))
    monkeypatch.setitem(sys.modules, "diffusers", None)  # as if not installed
    with pytest.raises(ConfigError, match="needs diffusers"):
        Autoencoder.from_config(LatentConfig(vae=str(vaes.kl)))


def stored(out, part="shards"):
    """(bucket, sample) of every sample of the index's shards of `part`."""
    index = json.loads((out / "index.json").read_text())
    for shard in index[part]:
        with open(out / shard["path"], "rb") as stream:
            for sample in read_tar_samples(stream, shard["path"]):
                yield shard["bucket"], sample


def pixels_of(sample):
    with Image.open(io.BytesIO(sample.members["jpg"])) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)


@pytest.fixture(scope="module")
def prepared(vaes, tmp_path_factory):
    """A folder prepared with the tiny KL VAE, and one without."""
    root = tmp_path_factory.mktemp("prepared")
    src = image_folder(root / "src", 12)
    prepare_dataset(src, root / "latent", PrepareOptions(**{**OPTIONS.__dict__, "vae": str(vaes.kl)}))
    prepare_dataset(src, root / "pixel", OPTIONS)
    return root


def test_prepare_stores_the_latents_of_each_stored_image(vaes, prepared):
    autoencoder = Autoencoder.from_config(LatentConfig(vae=str(vaes.kl)))
    index = json.loads((prepared / "latent" / "index.json").read_text())
    assert index["autoencoder"] == autoencoder.identity()
    samples = list(stored(prepared / "latent")) + list(stored(prepared / "latent", "heldout"))
    assert len(samples) == 12 and len(index["heldout"]) > 0
    for _, sample in samples:
        latents = np.load(io.BytesIO(sample.members["lat.npy"]), allow_pickle=False)
        image = pixels_of(sample)[None].float() / 127.5 - 1  # as training reads the stored image
        assert latents.dtype == np.float16 and latents.shape == (4, image.shape[2] // 2, image.shape[3] // 2)
        expected = autoencoder.encode(image)[0]
        torch.testing.assert_close(torch.from_numpy(latents).float(), expected, atol=2e-3, rtol=2e-3)
    # Without a VAE: the same images and captions, no latents, an index as before.
    pixel = {s.key: s.members for _, s in stored(prepared / "pixel")}
    assert pixel == {s.key: {k: v for k, v in s.members.items() if k != "lat.npy"} for _, s in stored(prepared / "latent")}
    assert "autoencoder" not in json.loads((prepared / "pixel" / "index.json").read_text())


def test_latents_of_another_vae_cannot_be_added_to_a_prepared_folder(prepared, tmp_path):
    other = PrepareOptions(**{**OPTIONS.__dict__, "vae": str(tiny_kl(tmp_path / "other", seed=1))})
    with pytest.raises(ValueError, match="other inputs or options"):
        prepare_dataset(prepared / "src", prepared / "latent", other)


def test_prepare_refuses_buckets_the_vae_cannot_halve(vaes, tmp_path):
    src = image_folder(tmp_path / "src", 2)
    options = PrepareOptions(**{**OPTIONS.__dict__, "patch_size": 7, "vae": str(vaes.kl)})
    with pytest.raises(ValueError, match=r"patch_size \(7\) must be a multiple of the autoencoder's factor \(2\)"):
        prepare_dataset(src, tmp_path / "out", options)


def stages(*plan):
    return [SimpleNamespace(until_step=until, batch_size=batch, shards=None) for until, batch in plan]


def shard_source(root, autoencoder):
    return ShardSource(str(root), 0, 0, 1, 0, 1, None, stages=stages((100, 2)), partitions=1, autoencoder=autoencoder)


def test_the_source_carries_the_latents_of_its_vae_and_refuses_others(vaes, prepared, tmp_path):
    identity = Autoencoder.from_config(LatentConfig(vae=str(vaes.kl))).identity()
    by_pixels = {pixels_of(s).numpy().tobytes(): s.members["lat.npy"] for _, s in stored(prepared / "latent")}
    copy = {**identity, "vae": "org/flux-vae", "subfolder": "vae"}  # the same weights named otherwise
    source, stage = shard_source(prepared / "latent", copy), stages((100, 2))[0]
    for step in range(4):
        batch = source.batch(step, stage, 0)
        assert len(batch.latents) == len(batch.captions) == 2
        width, height = batch.images.shape[3], batch.images.shape[2]
        for latents, image in zip(batch.latents, batch.images):  # each sample's own latents
            assert latents.dtype == torch.float16 and latents.shape == (4, height // 2, width // 2)
            assert torch.equal(latents, torch.from_numpy(np.load(io.BytesIO(by_pixels[image.numpy().tobytes()]))))
        on_device = batch.latents_on("cpu")
        assert on_device.dtype == torch.float32 and torch.equal(on_device, torch.stack(batch.latents).float())
    assert shard_source(prepared / "latent", None).batch(0, stage, 0).latents is None
    with pytest.raises(ConfigError, match="latents were made by .*training uses .*weights="):
        shard_source(prepared / "latent", {**identity, "weights": "ffff0000"})
    with pytest.raises(ConfigError, match="dtype="):
        shard_source(prepared / "latent", {**identity, "dtype": "bfloat16"})
    with pytest.raises(ConfigError, match="holds no latents; prepare it with `pixrun data prepare ... vae="):
        shard_source(prepared / "pixel", identity)


def test_a_sample_without_latents_of_its_bucket_shape_is_skipped(vaes, prepared, tmp_path):
    identity = Autoencoder.from_config(LatentConfig(vae=str(vaes.kl))).identity()
    root = shutil.copytree(prepared / "latent", tmp_path / "data")
    shard = json.loads((root / "index.json").read_text())["shards"][0]
    key = f"{shard['bucket']}_{shard['path'][-10:-4]}_000000"
    without_member(root / shard["path"], f"{key}.lat.npy")
    stream = ShardStream(str(root), 1, partitions=1, num_workers=0, autoencoder=identity)
    batches = list(itertools.islice(stream.batches(0), len(stream)))
    assert sum(len(batch) for batch in batches) == len(stream) - 1
    assert all(len(batch.latents) == len(batch) for batch in batches)
    assert stream.skipped == {"missing latents": 1}
    sample = TarSample("k", {"jpg": b"", "txt": b"x"})
    bucket_pixels = io.BytesIO()
    Image.new("RGB", (16, 8)).save(bucket_pixels, "JPEG")
    wrong = io.BytesIO()
    np.save(wrong, np.zeros((4, 8, 4), np.float16))
    sample.members.update(jpg=bucket_pixels.getvalue(), **{"lat.npy": wrong.getvalue()})
    assert decode_sample(sample, (16, 8), (4, 4, 8)) == ("latent size differs from its bucket", None)
    assert decode_sample(sample, (16, 8), None)[1][3] is None  # not asked for: not read
    with pytest.raises(PlanError, match="holds no latents"):
        ShardStream(str(prepared / "pixel"), 1, partitions=1, autoencoder=identity)


def test_latents_follow_their_rows_for_any_number_of_workers(vaes, prepared):
    identity = Autoencoder.from_config(LatentConfig(vae=str(vaes.kl))).identity()
    runs = []
    for workers in (0, 2):
        stream = ShardStream(str(prepared / "latent"), 2, partitions=1, num_workers=workers, autoencoder=identity)
        runs.append(list(itertools.islice(stream.batches(0), len(stream))))
    for one, two in zip(*runs):
        assert torch.equal(one.images, two.images)
        assert all(torch.equal(a, b) for a, b in zip(one.latents, two.latents, strict=True))


def test_data_prepare_takes_a_vae_from_the_command_line(vaes, tmp_path, capsys):
    from pixrun.cli import main

    src = image_folder(tmp_path / "src", 3)
    options = ["resolution=32", "patch_size=8", "min_side=16", "processes=1"]
    code = main(["data", "prepare", str(src), str(tmp_path / "out"), *options, f"vae={vaes.pipeline}",
                 "vae_subfolder=vae", "vae_dtype=bfloat16"])
    assert code == 0 and "kept 3 of 3" in capsys.readouterr().out
    recorded = json.loads((tmp_path / "out" / "index.json").read_text())["autoencoder"]
    assert (recorded["class"], recorded["subfolder"], recorded["dtype"]) == ("AutoencoderDC", "vae", "bfloat16")
    assert all("lat.npy" in sample.members for _, sample in stored(tmp_path / "out"))
