"""`pixrun train | sample | eval | geneval | data | bench | plan | export`. Bad input ends with a one-line error and
exit code 2.

This module alone builds the parser and imports neither torch nor the model code, so that `pixrun --help` and a
mistyped argument answer at once: each command imports what it runs inside its `cmd_*` function.
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from pixrun.errors import ConfigError, TrainingError, UsageError, WeightsMissingError

USAGE_ERROR = 2


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """`pixrun bench`'s arguments (pixrun.bench.command reads them)."""
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after --warmup ones)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--stage", type=int, default=0, help="which stage of a staged config to time")
    parser.add_argument("--compare-diffusers", action="store_true",
                        help="time the denoiser's forward+backward against diffusers' PRXTransformer2DModel instead")


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    """`pixrun plan`'s arguments (pixrun.plan.command reads them)."""
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]")
    parser.add_argument("--budget", default="", help="a duration: 90s, 15m, 1h30m, 24h (default: train.budget)")
    parser.add_argument("--money", type=float, default=0.0, help="or a sum of money (needs --price)")
    parser.add_argument("--price", type=float, default=0.0, help="price of one device-hour")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per stage (after --warmup ones)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("args", nargs="*", metavar="[CONFIG] [key=value ...]")
    parser.add_argument(
        "--resume", nargs="?", const="latest", default=None, metavar="auto|CHECKPOINT",
        help="continue the run in run_dir from its latest checkpoint ('auto': only if there is one)",
    )


def add_sample_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: RUN/sample.png)")
    parser.add_argument("--num", type=int, default=1, help="images, side by side; image i uses seed + i")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (1 = none)")
    parser.add_argument("--sampler", choices=["euler", "heun"], default=None)
    parser.add_argument("--weights", choices=["ema", "weights"], default="ema")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--per-task", type=int, default=None, help="prompts per task (default: the run's eval config)")
    parser.add_argument("--weights", choices=["ema", "weights"], default="ema")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg", type=float, default=None, help="guidance scale (1 = none)")
    parser.add_argument("--sampler", choices=["euler", "heun"], default=None)
    parser.add_argument("--metrics", default=None, metavar="fid,kid,cmmd,dino_mmd,clip_score,pickscore",
                        help="also score image quality against the reference set, and clip_score/pickscore "
                        "against the prompts (the run's metrics config)")
    parser.add_argument("--num-images", type=int, default=None, help="images for --metrics (default: metrics config)")
    parser.add_argument("--reference", default=None, help="'shapes' or a folder of reference images")
    parser.add_argument("--mse-t", action="store_true", help="also the MSE of x0 in t-bins on held-out images")


def add_geneval_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path)
    parser.add_argument("metadata", type=Path, help="GenEval's evaluation_metadata.jsonl")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images-per-prompt", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--weights", choices=["ema", "weights"], default="ema")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    data_commands = parser.add_subparsers(dest="data_command", required=True)
    prepare = data_commands.add_parser(
        "prepare", help="image folder, img2dataset tar shards or a Parquet table -> WebDataset shards by bucket")
    prepare.add_argument("src", type=Path)
    prepare.add_argument("out", type=Path)
    prepare.add_argument("options", nargs="*", metavar="key=value",
                         help="PrepareOptions, e.g. resolution=512 patch_size=32 jpeg_quality=95 processes=8")
    prepare.add_argument("--text-encoder", default=None, metavar="HUB_ID|PATH",
                         help="store each caption's embeddings by this frozen encoder beside the sample")
    prepare.add_argument("--max-tokens", type=int, default=256)
    prepare.add_argument("--text-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                         help="the encoder's weights while embedding: train with the same text.dtype")
    prepare.add_argument("--text-subfolder", default="", help="the encoder's folder in --text-encoder (text.subfolder)")
    prepare.add_argument("--tokenizer-subfolder", default="", help="the tokenizer's folder (text.tokenizer_subfolder)")
    prepare.add_argument("--text-clean", default="basic", choices=["none", "basic", "web", "prx"],
                         help="prompt cleaning: train with the same text.clean")


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--weights", choices=["ema", "weights"], default="ema")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pixrun", description="Train text-to-image diffusion models in pixel space.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name, add_arguments, about in (
        ("train", add_train_arguments, "train a model (no CONFIG: the built-in shapes-world default)"),
        ("sample", add_sample_arguments, "generate images for a prompt with a trained run"),
        ("eval", add_eval_arguments, "compositional (GenEval-style) scores of a trained run"),
        ("geneval", add_geneval_arguments, "write images for GenEval's prompt file, in its folder layout"),
        ("data", add_data_arguments, "prepare a data set for training"),
        ("bench", add_bench_arguments,
         "time training steps: images/s, FLOPs per image, MFU, peak memory; or compare with diffusers"),
        ("plan", add_plan_arguments,
         "what a budget buys per stage (steps, images, hours, cost), from a short bench, without training"),
        ("export", add_export_arguments,
         "write a run as a diffusers PRXPixelPipeline (pixel run) or PRXPipeline (latent run) folder"),
    ):
        add_arguments(commands.add_parser(name, help=about))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"train": cmd_train, "sample": cmd_sample, "eval": cmd_eval, "geneval": cmd_geneval,
                "export": cmd_export, "data": cmd_data, "bench": cmd_bench, "plan": cmd_plan}
    try:
        return commands[args.command](args)
    except (ConfigError, UsageError, FileNotFoundError, WeightsMissingError) as e:
        print(f"pixrun: error: {e}", file=sys.stderr)
        return USAGE_ERROR
    except TrainingError as e:
        print(f"pixrun: error: {e}", file=sys.stderr)
        return 1


def cmd_train(args) -> int:
    from pixrun.config import load_config
    from pixrun.train import train

    config_path = None
    overrides = list(args.args)
    if overrides and "=" not in overrides[0]:
        config_path = overrides.pop(0)
    train(load_config(config_path, overrides), resume=args.resume)
    return 0


def _sample_config(sample, args):
    """The run's sampling settings with the command line's changes."""
    given = {"steps": args.steps, "cfg_scale": args.cfg, "sampler": args.sampler}
    changes = {k: v for k, v in given.items() if v is not None}
    sample = dataclasses.replace(sample, **changes)
    try:
        sample.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return sample


def cmd_sample(args) -> int:
    import numpy as np
    from PIL import Image

    from pixrun.pipeline import load_run, to_uint8

    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    if args.num < 1:
        raise UsageError("--num must be at least 1")
    run = load_run(args.run, weights=args.weights)
    sample = _sample_config(run.sample, args)
    images = to_uint8(run.generate([args.prompt] * args.num, seed=args.seed, sample=sample))
    out = args.out or args.run / "sample.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(list(images), axis=1)).save(out)
    print(out)
    return 0


def cmd_eval(args) -> int:
    from pixrun.evaluate import evaluate_run, scores_source

    per_task = args.per_task
    if per_task is not None and per_task < 1:
        raise UsageError("--per-task must be at least 1")
    from pixrun.pipeline import load_run_config

    run_config = load_run_config(args.run)
    sample = _sample_config(run_config.sample, args)
    scored = scores_source(run_config)
    if not scored and (args.metrics or not args.mse_t):
        raise UsageError(f"the run trained on data.source={run_config.data.source}, and the evaluator and --metrics "
                         "prompt the shapes world: ask for --mse-t (its held-out samples), or set train.metrics_every "
                         "to measure while training")
    scores = evaluate_run(args.run, per_task=per_task, weights=args.weights, sample=sample) if scored else {}
    if args.metrics or args.mse_t:
        scores.update(_quality(args, sample))
    if args.json:
        print(json.dumps(scores))
    else:
        for name, value in scores.items():
            print(f"{name:>16}  {'n/a' if value is None else f'{value:.3f}'}")
    return 0


def _quality(args, sample) -> dict[str, float]:
    from pixrun.metrics import load_networks, mse_by_t, shapes_quality_metrics
    from pixrun.pipeline import build_world, load_run, load_run_config
    from pixrun.runtime import resolve_device

    run_config = load_run_config(args.run)
    run = load_run(args.run, weights=args.weights, device=resolve_device(run_config.train.device))
    run.sample = sample
    world = build_world(run_config)
    config = run_config.metrics
    changes = {"num_images": args.num_images, "reference": args.reference}
    if args.metrics:
        changes["metrics"] = [m.strip() for m in args.metrics.split(",") if m.strip()]
    config = dataclasses.replace(config, **{k: v for k, v in changes.items() if v is not None})
    try:
        config.validate()
    except ValueError as e:
        raise UsageError(str(e)) from None
    scores = {}
    if args.metrics:
        networks = load_networks(config, next(run.denoiser.parameters()).device)
        scores.update(shapes_quality_metrics(run, world, config, networks))
    if args.mse_t:
        scores.update(mse_by_t(run, *_held_out(run_config, world, run.resolution, config), seed=config.seed))
    return scores


def _held_out(run_config, world, resolution: int, config) -> tuple:
    """(images in [-1, 1], captions) that `pixrun eval --mse-t` denoises: the shapes world's reference scenes, or
    the held-out samples of the run's own data source at its last stage (prepared shards: those of `heldout=N`)."""
    from pixrun.data.source import DATA_SOURCES
    from pixrun.metrics import shapes_reference
    from pixrun.runtime import World

    if run_config.data.source == "shapes":
        reference = shapes_reference(world, resolution, config.num_images, config.seed)
        return reference.load(), reference.captions
    source = DATA_SOURCES[run_config.data.source].build(run_config, World())
    held_out = source.held_out(run_config.stage_plan()[-1], config.num_images, config.seed)
    if len(held_out) == 0:
        raise UsageError(f"the run's data ({run_config.data.source}) holds no held-out samples to denoise "
                         "(prepared shards: prepare them with heldout=N)")
    return held_out.floats(), held_out.captions


def cmd_geneval(args) -> int:
    from pixrun.geneval_export import export_geneval
    from pixrun.pipeline import load_run, load_run_config
    from pixrun.runtime import resolve_device

    if args.images_per_prompt < 1:
        raise UsageError("--images-per-prompt must be at least 1")
    if not args.metadata.is_file():
        raise UsageError(f"{args.metadata} does not exist")
    device = resolve_device(load_run_config(args.run).train.device)
    run = load_run(args.run, weights=args.weights, device=device)
    try:
        count = export_geneval(run, args.metadata, args.out, images_per_prompt=args.images_per_prompt, seed=args.seed)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(f"{args.out}: {count} prompts x {args.images_per_prompt} images")
    return 0


def cmd_data(args) -> int:
    from pixrun.config import options_from
    from pixrun.data.prepare import PrepareOptions, prepare_dataset

    options = options_from(PrepareOptions, args.options, "prepare")
    embed = identity = None
    if args.text_encoder:
        embed, identity = _caption_embedder(args.text_encoder, args.max_tokens, args.text_dtype,
                                            args.text_subfolder, args.tokenizer_subfolder, args.text_clean)
    try:
        report = prepare_dataset(args.src, args.out, options, embed, identity)
    except ValueError as e:
        raise UsageError(str(e)) from None
    print(report.summary())
    return 0


def _caption_embedder(encoder: str, max_tokens: int, dtype: str = "bfloat16", subfolder: str = "",
                      tokenizer_subfolder: str = "", clean: str = "basic"):
    """Captions -> one float16 array (tokens, dim) each, without padding, by a frozen pretrained encoder; and the
    encoder's identity, which the index records so that training with another encoder is refused."""
    import torch

    from pixrun.runtime import resolve_device
    from pixrun.text import TextConfig, TextTower

    config = TextConfig(encoder=encoder, subfolder=subfolder, tokenizer_subfolder=tokenizer_subfolder,
                        max_tokens=max_tokens, dtype=dtype, clean=clean)
    tower = TextTower.build(config, []).to(resolve_device("auto"))

    @torch.no_grad()
    def embed(captions: list[str]) -> list:
        states, mask = tower(captions)
        return [s[m].to(torch.float16).cpu().numpy() for s, m in zip(states, mask)]

    return embed, tower.identity()


def cmd_bench(args) -> int:
    from pixrun.bench import command

    return command(args)


def cmd_plan(args) -> int:
    from pixrun.plan import command

    return command(args)


def cmd_export(args) -> int:
    from pixrun.export import export_run, parity_notes
    from pixrun.pipeline import load_run_config

    out = export_run(args.run, args.out, weights=args.weights)
    print(out)
    for note in parity_notes(load_run_config(args.run)):
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
