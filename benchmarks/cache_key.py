"""What checking the decode cache against its image folder costs, on a whole CIFAR-10 image folder.

data.folder_listing (each file's path, size, mtime and ctime: the check that runs before every cached load) against
a SHA-1 of every file's bytes (the alternative it was chosen over), each timed --rounds times in turns, median; then
a whole cached data.load_split (listing, comparison, reading the arrays). Run it twice: the first run of the day reads
the files cold, the second from the page cache.

    python benchmarks/cache_key.py --data-dir ../shared/data/cifar10
"""
import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
import report  # noqa: E402


def content_hash(split_dir):
    h = hashlib.sha1()
    for root, dirs, files in os.walk(split_dir, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            h.update(Path(root, name).read_bytes())
    return h.hexdigest()


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("CIFAR10_DIR", "data"), help="an image-folder CIFAR-10")
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    splits = [Path(a.data_dir) / s for s in ("train", "test")]
    ways = {"listing (path, size, mtime, ctime)": data.folder_listing, "SHA-1 of every file's bytes": content_hash}
    times = {name: [] for name in ways}
    for r in range(a.rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            for split in splits:
                way(split)
            times[name].append(time.perf_counter() - start)
            print(f"round {r + 1}: {name} {times[name][-1]:.3f} s", flush=True)
    files = sum(len(data.folder_listing(s)[0]) for s in splits)
    print(f"\n{report.platform_cpu()}, {torch.backends.cpu.get_cpu_capability()}; {files} files in {a.data_dir}, "
          f"{a.rounds} rounds, median (min-max):")
    for name, t in times.items():
        print(f"  {name}: {statistics.median(t):.3f} s ({min(t):.3f}-{max(t):.3f})")
    with tempfile.TemporaryDirectory() as cache:
        for split in ("train", "test"):
            data.load_split(a.data_dir, split == "train", cache)  # decodes and writes the cache
        loads = []
        for _ in range(a.rounds):
            start = time.perf_counter()
            for split in ("train", "test"):
                data.load_split(a.data_dir, split == "train", cache)
            loads.append(time.perf_counter() - start)
    print(f"  a cached load_split of both splits: {statistics.median(loads):.3f} s ({min(loads):.3f}-{max(loads):.3f})")


if __name__ == "__main__":
    main()
