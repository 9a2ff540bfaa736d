"""Data: both layouts, labels, cache, errors, subsets, batched augmentation."""
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

import data
import utils
from conftest import class_image, write_folder


def labels_from_pixels(images):
    return (images[..., 0].float().mean((1, 2)) / 25).round().long()


def test_find_layout(tiny_folder, official, tmp_path):
    assert data.find_layout(tiny_folder) == "folder"
    assert data.find_layout(official) == "official"
    assert data.find_layout(tmp_path / "nothing") is None


@pytest.mark.parametrize("fmt", ["png", "jpg"])
def test_image_folder_labels_follow_cifar10_order(tmp_path, fmt):
    root = write_folder(tmp_path / "cifar", per_class=2, fmt=fmt)
    images, labels = data.load_split(root, train=True, cache_dir=tmp_path / "cache")
    assert images.dtype == torch.uint8 and images.shape == (20, 32, 32, 3)
    assert labels.dtype == torch.int64 and labels.tolist() == [c for c in range(10) for _ in range(2)]
    assert torch.equal(labels_from_pixels(images), labels)  # JPEG keeps the flat red channel close enough


def test_official_layout_labels(official, tmp_path):
    images, labels = data.load_split(official, train=False, cache_dir=tmp_path / "cache")
    assert images.shape == (30, 32, 32, 3) and images.dtype == torch.uint8
    assert torch.equal(labels_from_pixels(images), labels)
    assert torch.equal(images[4], torch.from_numpy(class_image(1, 4)))
    train = data.load_cifar10(official, tmp_path / "cache")["train"]
    assert len(train[1]) == 150


def test_decode_cache_is_used_and_replaced_when_the_folder_changes(tiny_folder, tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    first = data.load_split(tiny_folder, train=True, cache_dir=cache)
    assert len(list(cache.glob("train-*.npz"))) == 1
    with monkeypatch.context() as m:  # the second load must come from the cache
        m.setattr(data, "_decode_folder", lambda split_dir: pytest.fail("decoded although the cache is current"))
        second = data.load_split(tiny_folder, train=True, cache_dir=cache)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    Image.fromarray(class_image(0, 99)).save(tiny_folder / "train" / "airplane" / "extra.png")
    capsys.readouterr()
    third = data.load_split(tiny_folder, train=True, cache_dir=cache)
    assert len(third[1]) == len(first[1]) + 1
    assert "changed since it was decoded (files 1 added)" in capsys.readouterr().out
    assert len(list(cache.glob("train-*.npz"))) == 1  # the folder's entry is replaced, the cache does not grow


def swap_folders(root, a="cat", b="dog"):
    """Relabel by renames, as a user fixing labels would: every file keeps its name, size and mtime."""
    da, db, tmp = root / "train" / a, root / "train" / b, root / "swap"
    da.rename(tmp)
    db.rename(da)
    tmp.rename(db)


def move_one(root):
    (root / "train" / "cat" / "0000.bmp").rename(root / "train" / "dog" / "moved.bmp")


def edit_one(root):
    """New pixels in one file of the same size, with its old mtime put back (as a tool that keeps it would)."""
    path = root / "train" / "cat" / "0001.bmp"
    before = path.stat()
    Image.fromarray(class_image(9, 1)).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size and path.stat().st_mtime_ns == before.st_mtime_ns


@pytest.mark.parametrize("change", [swap_folders, move_one, edit_one])
def test_a_relabelled_or_edited_folder_is_decoded_again(change, tmp_path, capsys):
    root = write_folder(tmp_path / "cifar", per_class=3, fmt="bmp")  # BMP: every file has the same size
    cache = tmp_path / "cache"
    first = data.load_split(root, train=True, cache_dir=cache)
    time.sleep(0.02)  # file times tick with the kernel's coarse clock: let the change get a later one
    change(root)
    capsys.readouterr()
    after = data.load_split(root, train=True, cache_dir=cache)
    assert "changed since it was decoded" in capsys.readouterr().out
    fresh = data.load_split(root, train=True, cache_dir=tmp_path / "fresh")  # what the folder now holds
    assert torch.equal(after[0], fresh[0]) and torch.equal(after[1], fresh[1])
    assert not (torch.equal(after[0], first[0]) and torch.equal(after[1], first[1]))
    assert torch.equal(data.load_split(root, train=True, cache_dir=cache)[1], fresh[1])  # the new entry serves


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other arrays"])
def test_a_damaged_cache_is_decoded_again_and_rewritten(damage, tiny_folder, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    first = data.load_split(tiny_folder, train=True, cache_dir=cache)
    (file,) = cache.glob("train-*.npz")
    if damage == "truncated":
        file.write_bytes(file.read_bytes()[:file.stat().st_size // 2])
    elif damage == "garbage":
        file.write_bytes(os.urandom(4096))
    else:  # a complete zip of the wrong content: the listing matches, the images do not
        with np.load(file) as z:
            np.savez(file, images=z["images"][:3], labels=z["labels"], paths=z["paths"], stats=z["stats"])
    capsys.readouterr()
    healed = data.load_split(tiny_folder, train=True, cache_dir=cache)
    assert f"the decode cache '{file}' is damaged" in capsys.readouterr().out
    assert torch.equal(healed[0], first[0]) and torch.equal(healed[1], first[1])
    with monkeypatch.context() as m:  # rewritten whole: the next load reads it
        m.setattr(data, "_decode_folder", lambda split_dir: pytest.fail("the cache was not rewritten"))
        assert torch.equal(data.load_split(tiny_folder, train=True, cache_dir=cache)[1], first[1])


def test_folder_listing_costs_stat_calls_only(tiny_folder):
    paths, stats = data.folder_listing(tiny_folder / "train")
    assert len(paths) == len(stats) == 30 and paths[0] == b"airplane/0000.png" and stats.shape == (30, 3)
    assert (stats[:, 0] == [(tiny_folder / "train" / p.decode()).stat().st_size for p in paths]).all()


def test_missing_and_extra_class(tmp_path):
    root = write_folder(tmp_path / "a", per_class=1, classes=data.CLASSES[:9])
    with pytest.raises(utils.UserError, match=r"missing: \['truck'\]"):
        data.load_split(root, train=True, cache_dir=tmp_path / "cache")
    root = write_folder(tmp_path / "b", per_class=1, classes=data.CLASSES + ["zebra"])
    with pytest.raises(utils.UserError, match=r"unexpected: \['zebra'\]"):
        data.load_split(root, train=True, cache_dir=tmp_path / "cache")


def test_corrupt_image_is_named(tiny_folder, tmp_path):
    bad = tiny_folder / "train" / "cat" / "0001.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(utils.UserError, match="0001.png"):
        data.load_split(tiny_folder, train=True, cache_dir=tmp_path / "cache")


def test_balanced_subset_is_balanced_and_seeded():
    labels = torch.arange(10).repeat_interleave(50)
    idx = data.balanced_subset(labels, 95, seed=3)
    counts = torch.bincount(labels[idx], minlength=10)
    assert len(idx) == 95 and counts.max() - counts.min() <= 1 and len(idx.unique()) == 95
    assert torch.equal(idx, data.balanced_subset(labels, 95, seed=3))
    assert not torch.equal(idx, data.balanced_subset(labels, 95, seed=4))


@pytest.mark.parametrize("padding", [0, 2, 4])
def test_augment_is_a_padded_crop_or_its_mirror(padding):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    out = data.augment(images, g, padding)
    assert out.shape == images.shape and out.dtype == torch.uint8
    p = padding
    padded = torch.nn.functional.pad(images.permute(0, 3, 1, 2), (p, p, p, p)).permute(0, 2, 3, 1)
    flips, offsets = 0, set()
    for n in range(64):
        windows = [(t, l, f) for t in range(2 * p + 1) for l in range(2 * p + 1) for f in (False, True)
                   if torch.equal(out[n], (lambda w: w.flip(1) if f else w)(padded[n, t:t + 32, l:l + 32]))]
        assert windows, f"sample {n} is not a crop of its padded image"
        flips += windows[0][2]
        offsets.add(windows[0][:2])
    assert 10 < flips < 54  # about half are mirrored
    assert len(offsets) > min(10, 2 * p)  # the crop moves over the whole padded range


def test_cutout_paints_one_mean_coloured_square_per_image_over_the_same_crops():
    images = torch.randint(0, 256, (200, 32, 32, 3), dtype=torch.uint8)
    plain = data.augment(images, torch.Generator().manual_seed(0), 2)
    cut = data.augment(images, torch.Generator().manual_seed(0), 2, cutout=8)
    mean = torch.tensor(data.MEAN_UINT8, dtype=torch.uint8)
    changed = (cut != plain).any(-1)  # (200, 32, 32)
    square = (cut == mean).all(-1) & ~(plain == mean).all(-1)
    assert torch.equal(changed, square)  # only the square changes, and it holds the mean colour
    rows, cols = square.any(2).sum(1), square.any(1).sum(1)
    assert torch.equal(rows * cols, square.sum((1, 2)))  # one rectangle per image
    assert rows.max() == cols.max() == 8 and rows.min() >= 4  # 8 x 8, cut by the border at most to 4
    assert (square.sum((1, 2)) == 64).float().mean() > 0.5
    assert data.normalize(mean.expand(1, 32, 32, 3)).abs().max() < 0.01  # ~0 after normalising (1 step: 0.016)


def test_normalize_gives_normalised_nchw_floats():
    images = torch.full((4, 32, 32, 3), 255, dtype=torch.uint8)
    x = data.normalize(images)
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32
    for c in range(3):
        assert torch.allclose(x[:, c], torch.tensor((1 - data.MEAN[c]) / data.STD[c]))


def test_batches_cover_the_epoch_and_repeat_with_the_seed():
    images = torch.randint(0, 256, (50, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(50)
    run = lambda seed: [(x.clone(), y.clone()) for x, y in data.Batches(images, labels, 16, seed, "cpu")]
    a, b, c = run(0), run(0), run(1)
    assert [len(y) for _, y in a] == [16, 16, 16, 2]
    assert sorted(torch.cat([y for _, y in a]).tolist()) == list(range(50))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not torch.equal(torch.cat([y for _, y in a]), torch.cat([y for _, y in c]))
    assert a[0][0].dtype == torch.float32 and a[0][0].shape == (16, 3, 32, 32)


@pytest.mark.parametrize("n, sizes", [(65, [64]), (66, [64, 2])])
def test_a_last_batch_of_one_image_is_left_out(n, sizes):
    """Batch norm cannot train on one image where a map is 1x1 (ResNet18's layer4): such a batch is dropped."""
    batches = data.Batches(torch.zeros(n, 32, 32, 3, dtype=torch.uint8), torch.arange(n) % 10, 64, 0, "cpu")
    assert [len(y) for _, y in batches] == sizes and len(batches) == len(sizes)
    assert batches.dropped == n - sum(sizes)


def test_max_batches_ends_each_epoch_early_on_a_fresh_part_of_the_data():
    images = torch.randint(0, 256, (50, 32, 32, 3), dtype=torch.uint8)
    batches = data.Batches(images, torch.arange(50), 16, 0, "cpu", max_batches=2)
    first, second = [torch.cat([y for _, y in batches]) for _ in range(2)]
    assert len(batches) == 2 and len(first) == len(second) == 32
    assert len(set(first.tolist())) == 32 and set(first.tolist()) != set(second.tolist())
    assert len(data.Batches(images, torch.arange(50), 16, 0, "cpu", max_batches=9)) == 4
