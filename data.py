"""CIFAR-10 as uint8 tensors: the two folder layouts, torchvision's download, the decode cache, class-balanced subsets,
normalisation, batched augmentation and the training batches (Batches). Training and evaluation are in training.py."""
import hashlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

import utils

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MEAN_UINT8 = tuple(round(255 * m) for m in MEAN)  # the colour Cutout paints: zero after normalize()
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar_qat"


def find_layout(data_dir):
    """'official' (torchvision's cifar-10-batches-py), 'folder' (train/<class>/*) or None."""
    data_dir = Path(data_dir)
    if (data_dir / "cifar-10-batches-py").is_dir():
        return "official"
    if (data_dir / "train").is_dir() or (data_dir / "test").is_dir():
        return "folder"
    return None


def download_cifar10(data_dir):
    """torchvision's download of the official files; a clear utils.UserError when offline."""
    data_dir = Path(data_dir)
    existed = data_dir.exists()
    if existed and not data_dir.is_dir():
        raise utils.UserError(f"--data-dir '{data_dir}' is a file, not a folder")
    # The repo's data/ holds a .gitkeep, and a failed download may have left torchvision's archive behind.
    if existed and any(not p.name.startswith(".") and p.name != "cifar-10-python.tar.gz" for p in data_dir.iterdir()):
        raise utils.UserError(f"'{data_dir}' holds neither CIFAR-10 layout: expected torchvision's "
                              f"'cifar-10-batches-py/' or an image folder with 'train/' and 'test/'")
    try:
        CIFAR10(str(data_dir), train=True, download=True)
    except Exception as e:  # URLError, timeouts, bad checksum: all end the same way for the user
        if not existed:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise utils.UserError(f"no CIFAR-10 found in '{data_dir}' and the download failed ({type(e).__name__}: {e}); "
                              f"put torchvision's 'cifar-10-batches-py/' or an image folder 'train/<class>/*.png|jpg', "
                              f"'test/<class>/*' there, or point --data-dir / CIFAR10_DIR at a copy") from None


def _decode_folder(split_dir):
    """Decode an ImageFolder split once into uint8 (N, 32, 32, 3) plus CIFAR-10 labels."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if classes != CLASSES:
        missing = sorted(set(CLASSES) - set(classes))
        extra = sorted(set(classes) - set(CLASSES))
        raise utils.UserError(f"'{split_dir}' must hold exactly the 10 CIFAR-10 class folders; "
                              f"missing: {missing or 'none'}, unexpected: {extra or 'none'}")
    try:
        ds = ImageFolder(str(split_dir))
    except FileNotFoundError:  # raised when a class folder holds no image file
        raise utils.UserError(f"'{split_dir}' has no images in at least one class folder") from None
    images = np.empty((len(ds.samples), 32, 32, 3), np.uint8)
    for i, (path, _) in enumerate(tqdm(ds.samples, desc=f"decode {split_dir.name}", leave=False,
                                       mininterval=1, disable=None)):  # no bar in logs
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise utils.UserError(f"cannot decode image '{path}': {type(e).__name__}") from None
        if arr.shape != (32, 32, 3):
            raise utils.UserError(f"image '{path}' is {arr.shape[1]}x{arr.shape[0]}, CIFAR-10 images are 32x32")
        images[i] = arr
    return images, np.asarray(ds.targets, np.int64)


def folder_listing(split_dir):
    """What decides every image's pixels and label: each file's path under split_dir (class folder and name) with its
    size, mtime and ctime in ns, sorted. Moving, renaming, adding, removing or rewriting a file changes it; a move or
    an edit that keeps the old mtime still changes the ctime, which only the kernel sets. Returns (paths as bytes,
    int64 (N, 3) stats): stat calls only, 0.4 s for CIFAR-10's 60,000 files (docs/experiments.md)."""
    paths, stats = [], []
    for root, dirs, files in os.walk(split_dir, followlinks=True):  # as ImageFolder, which follows links
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            st = os.stat(path)
            paths.append(os.fsencode(os.path.relpath(path, split_dir)))
            stats.append((st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return np.array(paths, dtype=bytes), np.array(stats, np.int64).reshape(-1, 3)


def listing_change(old, new):
    """Why two folder listings differ, e.g. '2 added, 1 removed, 3 changed' (a moved file is removed + added)."""
    before, after = ({p: tuple(s) for p, s in zip(paths.tolist(), stats.tolist())} for paths, stats in (old, new))
    counts = {"added": len(after.keys() - before.keys()), "removed": len(before.keys() - after.keys()),
              "changed": sum(before[p] != after[p] for p in before.keys() & after.keys())}
    return ", ".join(f"{n} {what}" for what, n in counts.items() if n) or "reordered"


def read_cache(cache, split_dir, listing):
    """(images, labels) from the decode cache file when it is complete and was made from this very listing; None,
    with a one-line note saying why, when it is out of date or damaged (then the caller decodes again)."""
    if not cache.exists():
        return None
    try:
        with np.load(cache) as z:
            cached = z["paths"], z["stats"]
            if not all(np.array_equal(a, b) for a, b in zip(cached, listing)):
                print(f"note: '{split_dir}' changed since it was decoded (files {listing_change(cached, listing)}): "
                      f"decoding it again")
                return None
            images, labels = z["images"], z["labels"]
        if not (images.dtype == np.uint8 and images.shape[1:] == (32, 32, 3) and labels.dtype == np.int64
                and labels.shape == (len(images),) and ((labels >= 0) & (labels < len(CLASSES))).all()):
            raise ValueError("unexpected shapes or labels")
    except Exception as e:  # cut short, garbage, another format: the images are still there to decode
        print(f"note: the decode cache '{cache}' is damaged ({type(e).__name__}): decoding the images again")
        return None
    return images, labels


def load_split(data_dir, train, cache_dir=DEFAULT_CACHE_DIR):
    """One split as (uint8 tensor (N, 32, 32, 3), int64 labels); image folders are decoded once and cached."""
    data_dir, split = Path(data_dir), "train" if train else "test"
    if find_layout(data_dir) == "official":
        try:
            ds = CIFAR10(str(data_dir), train=train, download=False)
        except Exception as e:
            raise utils.UserError(f"'{data_dir / 'cifar-10-batches-py'}' is incomplete or corrupt ({e})") from None
        images, labels = ds.data, np.asarray(ds.targets, np.int64)
    else:
        split_dir = data_dir / split
        if not split_dir.is_dir():
            raise utils.UserError(f"image folder '{data_dir}' has no '{split}/' split")
        # One cache file per folder, named by its path and replaced when the folder changes; it holds the listing
        # it was decoded from, so that a relabelled or edited folder is never served stale images or labels.
        cache = Path(cache_dir) / f"{split}-{hashlib.sha1(str(split_dir.resolve()).encode()).hexdigest()[:16]}.npz"
        listing = folder_listing(split_dir)
        cached = read_cache(cache, split_dir, listing)
        if cached:
            images, labels = cached
        else:
            images, labels = _decode_folder(split_dir)
            try:
                utils.atomic_write(cache, lambda f: np.savez(f, images=images, labels=labels, paths=listing[0],
                                                             stats=listing[1]))
            except utils.WriteError as e:  # a read-only cache only costs time
                print(f"warning: {e} (decode cache); the run goes on")
    if len(labels) == 0:
        raise utils.UserError(f"the {split} split in '{data_dir}' is empty")
    return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)


def load_cifar10(data_dir, cache_dir=DEFAULT_CACHE_DIR):
    """{'train': (images, labels), 'test': (images, labels)}, downloading when no local copy is there."""
    if find_layout(data_dir) is None:
        download_cifar10(data_dir)
    return {"train": load_split(data_dir, True, cache_dir), "test": load_split(data_dir, False, cache_dir)}


def balanced_subset(labels, n, seed=0):
    """Sorted indices of a seeded subset with n // 10 images per class (the remainder to the first classes)."""
    g = torch.Generator().manual_seed(seed)
    classes = labels.unique().tolist()
    picked = []
    for k, c in enumerate(classes):
        want = n // len(classes) + (k < n % len(classes))
        idx = (labels == c).nonzero().flatten()
        picked.append(idx[torch.randperm(len(idx), generator=g)[:want]])
    return torch.cat(picked).sort().values


def normalize(images):
    """uint8 NHWC batch -> normalised float NCHW (channels_last in memory, which is what the convs like)."""
    x = TF.to_dtype(images.permute(0, 3, 1, 2), torch.float32, scale=True)
    return TF.normalize(x, MEAN, STD)


def augment(images, generator, padding=4, cutout=0):
    """RandomCrop(32, padding) + RandomHorizontalFlip (+ Cutout) for a whole uint8 NHWC batch at once.

    cutout > 0: a cutout x cutout square at a random centre (it may reach past the border) is set to the mean
    colour, which normalize() turns into zeros (DeVries & Taylor, 2017).
    """
    n = images.shape[0]
    padded = F.pad(images, (0, 0, padding, padding, padding, padding))  # zero padding of H and W, as RandomCrop
    top, left = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator).to(images.device)
    flip = (torch.rand(n, 1, generator=generator) < 0.5).to(images.device)
    steps = torch.arange(32, device=images.device)
    rows = top + steps
    cols = torch.where(flip, left + 31 - steps, left + steps)
    out = padded[torch.arange(n, device=images.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    if cutout:
        low = torch.randint(0, 32, (2, n, 1), generator=generator).to(images.device) - cutout // 2
        inside = (steps >= low) & (steps < low + cutout)  # (2, n, 32): rows, cols of each image's square
        square = inside[0][:, :, None] & inside[1][:, None, :]
        out = torch.where(square[..., None], torch.tensor(MEAN_UINT8, dtype=torch.uint8, device=images.device), out)
    return out


class Batches:
    """Shuffled, augmented training batches from uint8 tensors kept on the training device.

    Epoch e draws its order and augmentation from seed + e, so runs (and resumed runs) are repeatable.
    max_batches > 0 ends each epoch after that many batches (a different random part of the data each epoch);
    padding, cutout: the random crop's padding and the Cutout square's side (augment).
    Under torchrun a step is one global batch of batch_size x world images, augmented whole on every process,
    of which each process takes its share: the images and their augmentation per step do not depend on the
    number of processes. A last batch too small to give every process 2 images is left out of every epoch
    (dropped: their number), since batch norm cannot train on one image per channel map of 1x1.
    """

    def __init__(self, images, labels, batch_size, seed, device, max_batches=0, padding=4, cutout=0,
                 rank=None, world=None):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.seed, self.max_batches = batch_size, seed, max_batches
        self.padding, self.cutout = padding, cutout
        self.rank = utils.get_rank() if rank is None else rank
        self.world = utils.get_world_size() if world is None else world
        self.epoch, self.data_seconds = 0, 0.0  # a resumed run sets epoch to the epochs already done

    @property
    def dropped(self):
        rest = len(self.labels) % (self.batch_size * self.world)
        return rest if rest < 2 * self.world else 0

    def __len__(self):
        n = -(-(len(self.labels) - self.dropped) // (self.batch_size * self.world))
        return min(n, self.max_batches) if self.max_batches else n

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.labels), generator=g).to(self.images.device)
        step = self.batch_size * self.world
        for start in range(0, len(self) * step, step):
            t = time.perf_counter()
            idx = order[start:start + step]
            x = augment(self.images[idx], g, self.padding, self.cutout)
            if self.world > 1:
                share = torch.arange(len(idx), device=idx.device).tensor_split(self.world)[self.rank]
                x, idx = x[share], idx[share]
            x = normalize(x)
            self.data_seconds += time.perf_counter() - t
            yield x, self.labels[idx]
        self.epoch += 1


def calibration_batches(images, batch_size, batches, seed):
    """The first `batches` normalised, un-augmented batches of uint8 images in a seeded order: what PTQ calibrates
    on (--ptq-batches), in both flows."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    return [normalize(images[order[i:i + batch_size]])
            for i in range(0, min(batches * batch_size, len(images)), batch_size)]
