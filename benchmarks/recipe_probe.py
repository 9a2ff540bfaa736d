"""Float training scored on images held out of the training split, so that a recipe is not chosen on the test split.

Trains cifar.py's float stage (its recipe and flags) on the training split minus --holdout class-balanced images
and prints top-1 on those after every epoch; the test split is never read for scoring. --width-mult trains a
narrower or wider MobileNetV2 (torchvision's width_mult), to compare widths at equal training time.

    python benchmarks/recipe_probe.py --model mobilenet_v2 --width-mult 0.75 -- --epochs 12
"""
import argparse
import functools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cifar  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402
import report  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2", choices=list(models.ARCHS))
    p.add_argument("--width-mult", type=float, default=None, help="MobileNetV2 only; default: models.py's")
    p.add_argument("--holdout", type=int, default=5000, help="training images held out for scoring")
    p.add_argument("--holdout-seed", type=int, default=1234, help="which images are held out (fixed across probes)")
    p.add_argument("--out", default="/tmp/recipe_probe", help="checkpoint folder and result JSON")
    p.add_argument("cifar_args", nargs="*", help="cifar.py flags after --, e.g. -- --epochs 8 --seed 1")
    a = p.parse_args()
    if a.width_mult is not None:
        if a.model != "mobilenet_v2":
            p.error("--width-mult applies to mobilenet_v2 only")
        models.ARCHS["mobilenet_v2"] = functools.partial(models.ARCHS["mobilenet_v2"], width_mult=a.width_mult)
    args = cifar.parse_args(["--model", a.model, *a.cifar_args])
    torch.set_num_threads(args.threads)
    images, labels = data.load_cifar10(args.data_dir, args.cache_dir)["train"]
    held = torch.zeros(len(labels), dtype=torch.bool)
    held[data.balanced_subset(labels, a.holdout, a.holdout_seed)] = True
    splits = {"train": (images[~held], labels[~held]), "test": (images[held], labels[held])}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    _, history = cifar.train_float(args, splits, torch.device("cpu"), out)
    width = models.ARCHS[a.model].keywords.get("width_mult") if a.model == "mobilenet_v2" else None
    result = dict(model=a.model, width_mult=width, cifar_args=a.cifar_args, holdout=a.holdout,
                  holdout_acc=[round(h["test_acc"], 4) for h in history], seconds=round(time.perf_counter() - start),
                  images_per_s=round(sum(h["images_per_s"] for h in history) / len(history)),
                  cpu=report.platform_cpu(), capability=torch.backends.cpu.get_cpu_capability())
    print(json.dumps(result))
    with open(out / "result.json", "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
