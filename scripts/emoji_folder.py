"""A captioned image folder from the Noto emoji artwork of the npm package `emoji-datasource-google`: real images
no one here drew, for measuring what the default learns beyond the shapes world. The data stays out of the
repository; these are the commands that make it.

    mkdir -p /tmp/emoji && cd /tmp/emoji && npm pack emoji-datasource-google && tar xzf emoji-datasource-google-*.tgz
    python scripts/emoji_folder.py /tmp/emoji/package /tmp/emoji/folder
    pixrun data prepare /tmp/emoji/folder /tmp/emoji/shards resolution=64 patch_size=16 min_side=64 heldout=64

Each `img/google/64/<image>.png` becomes `<image>.png` with `<image>.txt` beside it: "an emoji of <name>", the
name from the package's `emoji.json` (Unicode's name, lower-cased), with its skin tones for a skin-tone variant.
"""

import argparse
import json
import shutil
from pathlib import Path

SKIN_TONES = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium", "1F3FE": "medium-dark", "1F3FF": "dark"}


def captions(package: Path) -> dict[str, str]:
    """Image file name -> caption, for every emoji and skin-tone variant whose 64-px image the package has."""
    found = {}
    for emoji in json.loads((package / "emoji.json").read_text()):
        name = (emoji.get("name") or emoji["short_name"].replace("_", " ")).lower()
        found[emoji["image"]] = f"an emoji of {name}"
        for tones, variant in (emoji.get("skin_variations") or {}).items():
            tone = " and ".join(dict.fromkeys(SKIN_TONES[code] for code in tones.split("-")))
            found[variant["image"]] = f"an emoji of {name}, {tone} skin tone"
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("package", type=Path, help="the unpacked npm package (the folder holding emoji.json)")
    parser.add_argument("out", type=Path, help="the folder to write: <image>.png + <image>.txt")
    args = parser.parse_args()
    images = args.package / "img" / "google" / "64"
    args.out.mkdir(parents=True, exist_ok=True)
    written = 0
    for image, caption in sorted(captions(args.package).items()):
        if (images / image).exists():
            shutil.copyfile(images / image, args.out / image)
            (args.out / image).with_suffix(".txt").write_text(caption + "\n")
            written += 1
    print(f"{written} captioned images in {args.out}")


if __name__ == "__main__":
    main()
