import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import data  # noqa: E402


def class_image(label, seed):
    """A 32x32 image whose red channel encodes the label, so tests can check labels from pixels."""
    rng = np.random.default_rng(seed)
    img = np.empty((32, 32, 3), np.uint8)
    img[..., 0] = label * 25
    img[..., 1:] = rng.integers(0, 256, 2, dtype=np.uint8)  # flat colours survive JPEG
    img[seed % 32, :, 1] = 255  # and a line, so images of one class differ
    return img


def write_folder(root, per_class=3, classes=data.CLASSES, fmt="png"):
    for split in ("train", "test"):
        for label, name in enumerate(classes):
            d = Path(root) / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(class_image(label, i)).save(d / f"{i:04d}.{fmt}")
    return Path(root)


def write_official(root, per_class=3):
    """torchvision's cifar-10-batches-py layout with generated pixels."""
    d = Path(root) / "cifar-10-batches-py"
    d.mkdir(parents=True)
    def batch(offset):
        labels = [c for c in range(10) for _ in range(per_class)]
        pixels = np.stack([class_image(c, offset + i).transpose(2, 0, 1).reshape(-1)
                           for i, c in enumerate(labels)])
        return {"data": pixels, "labels": labels}
    for i in range(1, 6):
        pickle.dump(batch(100 * i), open(d / f"data_batch_{i}", "wb"))
    pickle.dump(batch(0), open(d / "test_batch", "wb"))
    pickle.dump({"label_names": data.CLASSES}, open(d / "batches.meta", "wb"))
    return Path(root)


@pytest.fixture
def tiny_folder(tmp_path):
    return write_folder(tmp_path / "cifar")


@pytest.fixture
def official(tmp_path, monkeypatch):
    # Generated files cannot match the official MD5 sums; everything else is the real torchvision reader.
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *args, **kwargs: True)
    return write_official(tmp_path / "official")


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """A generated image folder of 20 images per class and split, for quick pipeline runs."""
    return write_folder(tmp_path_factory.mktemp("data") / "cifar", per_class=20)


@pytest.fixture(scope="session")
def cifar_dir():
    d = os.environ.get("CIFAR10_DIR")
    if not d:
        pytest.skip("CIFAR10_DIR is not set: the tests on real CIFAR-10 images are skipped")
    return d


@pytest.fixture(scope="session")
def real_images(cifar_dir, tmp_path_factory):
    """A class-balanced batch of 200 real CIFAR-10 test images (uint8 NHWC) and labels."""
    images, labels = data.load_split(cifar_dir, train=False)
    idx = data.balanced_subset(labels, 200, seed=1)
    return images[idx], labels[idx]


def run_cli(*args, env=None, timeout=600):
    """cifar.py in a subprocess, offline (a dead proxy makes any download fail at once)."""
    full_env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9",
                "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9", **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "cifar.py"), *map(str, args)], capture_output=True,
                          text=True, env=full_env, timeout=timeout, cwd=ROOT)


SMOKE_BITS = {"mobilenet_v2": 8, "resnet18": 4}
SMOKE_FLOW = {"mobilenet_v2": "both", "resnet18": "eager"}  # PT2E has 8-bit weights only


@pytest.fixture(scope="session")
def smoke(cifar_dir, tmp_path_factory):
    """The real pipeline, once per model, on a small CIFAR-10 subset: {model: (out folder, process)}.

    MobileNetV2 runs both flows with 8-bit weights, ResNet18 the eager flow with 4-bit ones (SMOKE_BITS, SMOKE_FLOW)."""
    runs = {}
    for model, bits in SMOKE_BITS.items():
        out = tmp_path_factory.mktemp(f"smoke_{model}")
        proc = run_cli("--model", model, "--epochs", 2, "--qat-epochs", 1, "--train-subset", 1000,
                       "--test-subset", 300, "--data-dir", cifar_dir, "--out-dir", out,
                       "--bench-runs", 5, "--bench-warmup", 2, "--ptq-batches", 4, "--weight-bits", bits,
                       "--flow", SMOKE_FLOW[model])
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[model] = (out / model, proc)
    return runs


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs the pipeline in subprocesses (pytest -m 'not slow' skips it)")


def pytest_collection_modifyitems(items):
    """The tests on the real pipeline's fixtures are slow too."""
    for item in items:
        if {"smoke", "fitted", "finished"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
