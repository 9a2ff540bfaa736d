"""Training throughput, this project's recipe vs the seed's, for the same number of batches in one process.

seed: per-sample torchvision transforms (RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize)
      through a DataLoader with 2 workers, NCHW, eager, SGD.
ours: cifar.py's path: decoded uint8 tensors, batched tensor augmentation, channels_last, SGD.
Both run float training and QAT fine-tuning (the same fusion and qconfig) on the same model and batch size.

    python benchmarks/train_throughput.py --model mobilenet_v2 --batches 40
"""
import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
from PIL import Image
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402
import utils  # noqa: E402


class SeedDataset(torch.utils.data.Dataset):
    """In-memory CIFAR-10 served as PIL images, as torchvision.datasets.CIFAR10 does."""

    def __init__(self, images, labels):
        self.images, self.labels = images.numpy(), labels.tolist()
        self.transform = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(),
                                             transforms.ToTensor(), transforms.Normalize(utils.MEAN, utils.STD)])

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def images_per_s(model, batches, n, warmup):
    """Train for warmup + n batches (data loading included); images/s over the last n."""
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    seen, it = 0, iter(batches)
    for i in range(warmup + n):
        if i == warmup:
            start, seen = time.perf_counter(), 0
        x, y = next(it)
        loss = criterion(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="mobilenet_v2", choices=list(models.ARCHS))
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DIR", "data"))
    p.add_argument("--batches", type=int, default=40, help="timed batches per measurement")
    p.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images, labels = utils.load_split(args.data_dir, train=True)
    need = (args.batches + args.warmup) * args.batch_size
    images, labels = images[:need], labels[:need]

    def seed_batches():
        return torch.utils.data.DataLoader(SeedDataset(images, labels), args.batch_size, shuffle=True,
                                           num_workers=2, drop_last=True, persistent_workers=True)

    def our_batches():
        return utils.Batches(images, labels, args.batch_size, seed=0, device="cpu")

    results = {}
    for phase in ("float", "qat"):
        for recipe, batches, layout in (("seed", seed_batches, torch.contiguous_format),
                                        ("ours", our_batches, torch.channels_last)):
            torch.manual_seed(0)
            model = models.create_model(args.model)
            if phase == "qat":
                models.prepare_quantization(model, qat=True)
            model.to(memory_format=layout)
            results[phase, recipe] = images_per_s(model, batches(), args.batches, args.warmup)
            print(f"{args.model} {phase:5s} {recipe:4s}: {results[phase, recipe]:7.1f} img/s", flush=True)
    print(f"\n{args.model}, batch {args.batch_size}, {args.threads} threads, {args.batches} timed batches "
          f"after {args.warmup} warm-up, torch {torch.__version__}")
    for phase in ("float", "qat"):
        ratio = results[phase, "ours"] / results[phase, "seed"]
        print(f"{phase:5s}: seed {results[phase, 'seed']:.1f} img/s, ours {results[phase, 'ours']:.1f} img/s, "
              f"ratio {ratio:.2f}x")


if __name__ == "__main__":
    main()
