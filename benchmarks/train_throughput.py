"""Training throughput, this project's recipe vs the seed's, for the same number of batches in one process.

seed: per-sample torchvision transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize)
      through a DataLoader with 2 workers, NCHW, eager, SGD.
ours: cifar.py's path: decoded uint8 tensors, batched tensor augmentation (with the model's crop padding and
      Cutout), channels_last, SGD.
ours, no data: ours on one batch over and over, no data handling at all: the ceiling of any faster data pipeline.
Both run float training and QAT fine-tuning (the same fusion and qconfig) on the same model and the same number of
images: the seed in batches of 128, ours in cifar.py's default batch for the model (--batch-size to change it).

Everything compared is timed in alternating rounds (--rounds): this machine's speed drifts by 10-30% within
minutes, and timing one side after the other once made torch.compile look 1.25x faster when it was not.

    python benchmarks/train_throughput.py --model mobilenet_v2 --batches 40 [--levers]
"""
import argparse
import itertools
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cifar  # noqa: E402
import data  # noqa: E402
import models  # noqa: E402


class SeedDataset(torch.utils.data.Dataset):
    """In-memory CIFAR-10 served as PIL images, as torchvision.datasets.CIFAR10 does."""

    def __init__(self, images, labels):
        self.images, self.labels = images.numpy(), labels.tolist()
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor(), transforms.Normalize(data.MEAN, data.STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def trainer(model, batches, bf16=False):
    """A function that trains model on its next k batches (data loading included): -> (images, seconds)."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    it = iter(batches)

    def train(k):
        seen, start = 0, time.perf_counter()
        for _ in range(k):
            x, y = next(it)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(y)
        return seen, time.perf_counter() - start
    return train


def interleaved(trainers, batches, rounds):
    """images/s of each {name: (train, threads)} over `batches` batches, taken in turns over `rounds` rounds."""
    totals = {name: [0, 0.0] for name in trainers}
    for _ in range(rounds):
        for name, (train, threads) in trainers.items():
            torch.set_num_threads(threads)
            seen, seconds = train(batches // rounds)
            totals[name][0] += seen
            totals[name][1] += seconds
    return {name: seen / seconds for name, (seen, seconds) in totals.items()}


def warm_up(train, n):
    """Run n untimed batches twice; the first pass's extra time over the second is compile time."""
    first = train(n)[1]
    return max(first - train(n)[1], 0.0)


SEED_BATCH = 128


def same_images(train, batch_size):
    """train(k) for k batches of SEED_BATCH images, whatever batch_size train uses."""
    return lambda k: train(max(k * SEED_BATCH // batch_size, 1))


def our_batches(model_name, images, labels, batch_size):
    """cifar.py's training batches for the model: its crop padding and Cutout."""
    d = cifar.DEFAULTS[model_name]
    return data.Batches(images, labels, batch_size, seed=0, device="cpu", padding=d["crop_padding"],
                        cutout=d["cutout"])


def levers(args, images, labels):
    """Float training with our recipe, one lever changed at a time, all variants timed in turns."""
    variants = [("ours: channels_last, fp32, eager", {}), ("NCHW instead of channels_last", dict(nchw=True)),
                ("bf16 autocast", dict(bf16=True)), ("torch.compile", dict(compile=True)),
                *[(f"batch {b}", dict(batch_size=b)) for b in (32, 64, 128, 256) if b != args.batch_size],
                ("1 thread", dict(threads=1))]
    trainers, compile_s = {}, {}
    for name, v in variants:
        threads = v.get("threads", args.threads)
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = models.create_model(args.model)
        model.to(memory_format=torch.contiguous_format if v.get("nchw") else torch.channels_last)
        if v.get("compile"):
            model = torch.compile(model)
        bs = v.get("batch_size", args.batch_size)
        train = trainer(model, our_batches(args.model, images, labels, bs), v.get("bf16", False))
        scaled = same_images(train, bs)  # the same number of images for every variant
        compile_s[name] = warm_up(scaled, args.warmup)
        trainers[name] = (scaled, threads)
    ips = interleaved(trainers, args.batches, args.rounds)
    print(f"\n{args.model} float training levers (ours: batch {args.batch_size}; {args.batches} x {SEED_BATCH} "
          f"timed images each, in {args.rounds} alternating rounds):")
    base = ips[variants[0][0]]
    for name, _ in variants:
        extra = f"  (compile {compile_s[name]:.0f} s)" if name == "torch.compile" else ""
        print(f"  {name:34s} {ips[name]:7.1f} img/s  {ips[name] / base:5.2f}x{extra}", flush=True)
    torch.set_num_threads(args.threads)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2", choices=list(models.ARCHS))
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DIR", "data"))
    p.add_argument("--batches", type=int, default=40, help=f"timed batches of {SEED_BATCH} images per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first (levers: twice, to time compiling)")
    p.add_argument("--rounds", type=int, default=4, help="rounds the timed batches are split in, all sides in turn")
    p.add_argument("--batch-size", type=int, default=None, help="ours (default: cifar.py's for --model)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--levers", action="store_true", help="also time float training with one setting changed at a time")
    args = p.parse_args()
    args.batch_size = args.batch_size or cifar.DEFAULTS[args.model]["batch_size"]
    torch.set_num_threads(args.threads)
    images, labels = data.load_split(args.data_dir, train=True)
    need = (args.batches + 2 * args.warmup) * max(SEED_BATCH, args.batch_size, 256 if args.levers else 0)
    images, labels = images[:need], labels[:need]

    def seed_batches():
        return torch.utils.data.DataLoader(SeedDataset(images, labels), SEED_BATCH, shuffle=True,
                                           num_workers=2, drop_last=True, persistent_workers=True)

    def ours():
        return our_batches(args.model, images, labels, args.batch_size)

    results = {}
    for phase in ("float", "qat"):
        trainers = {}
        for recipe, batches, layout, bs in (("seed", seed_batches, torch.contiguous_format, SEED_BATCH),
                                            ("ours", ours, torch.channels_last, args.batch_size),
                                            ("ours, no data", lambda: itertools.repeat(next(iter(ours()))),
                                             torch.channels_last, args.batch_size)):
            torch.manual_seed(0)
            model = models.create_model(args.model)
            if phase == "qat":
                models.prepare_quantization(model, qat=True)
            model.to(memory_format=layout)
            train = same_images(trainer(model, batches()), bs)
            train(args.warmup)
            trainers[recipe] = (train, args.threads)
        for recipe, ips in interleaved(trainers, args.batches, args.rounds).items():
            results[phase, recipe] = ips
            print(f"{args.model} {phase:5s} {recipe:13s}: {ips:7.1f} img/s", flush=True)
    print(f"\n{args.model}, batch {SEED_BATCH} (seed) / {args.batch_size} (ours), {args.threads} threads, "
          f"{args.batches} x {SEED_BATCH} timed images in "
          f"{args.rounds} alternating rounds after {args.warmup} warm-up, torch {torch.__version__}")
    for phase in ("float", "qat"):
        seed, ours, ceiling = (results[phase, r] for r in ("seed", "ours", "ours, no data"))
        print(f"{phase:5s}: seed {seed:.1f} img/s, ours {ours:.1f} img/s, ratio {ours / seed:.2f}x "
              f"(no data handling: {ceiling:.1f} img/s, {ceiling / seed:.2f}x)")
    if args.levers:
        levers(args, images, labels)


if __name__ == "__main__":
    main()
