"""Data, training loop and small helpers shared by cifar.py and the tests."""
import contextlib
import copy
import functools
import hashlib
import importlib.metadata
import io
import json
import math
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from torchvision.datasets import CIFAR10, ImageFolder
from torchvision.transforms.v2 import functional as TF
from tqdm import tqdm

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MEAN_UINT8 = tuple(round(255 * m) for m in MEAN)  # the colour Cutout paints: zero after normalize()
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar_qat"


# Every failure the command line reports as one line "error: ...", with its exit code (README: exit codes).
class UserError(Exception):
    """A problem with the user's input."""
    exit_code = 2


class RunError(Exception):
    """A stage that failed during the run, not because of the input (an exporter, a runtime, an observer)."""
    exit_code = 1


class Diverged(RunError):
    """Non-finite or exploding loss, weights or quantization parameters."""
    exit_code = 3


class WriteError(RunError):
    """An output file could not be written (no space, no permission, folder gone)."""
    exit_code = 4


class PeerFailed(RunError):
    """Under torchrun: a collective failed because another process of the job stopped (crash, kill, error)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (timeout, CI runners, docker stop, Kubernetes): handled like Ctrl-C, exit code 143."""


class Stages:
    """Wall time per stage; a stage that fails with an unexpected exception becomes a RunError naming it.

        stages = Stages()
        with stages("fp32_train"):
            ...
    """

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, name):
        start = time.perf_counter()
        try:
            yield
        except (UserError, RunError, KeyboardInterrupt):
            raise
        except Exception as e:
            message = (str(e).strip().splitlines() or [""])[0][:300]
            if dist.is_available() and dist.is_initialized() and (
                    isinstance(e, dist.DistError) or "closed by peer" in message or "reset by peer" in message):
                raise PeerFailed(f"stage {name}: another process of this torchrun job stopped ({message})") from e
            raise RunError(f"stage {name} failed: {type(e).__name__}: {message}") from e
        self.seconds[name] = time.perf_counter() - start


# ---------------------------------------------------------------- files

def atomic_write(path, write):
    """Call write(file) on a temporary file beside path, then rename it over path.

    Readers never see half a file, and a failed write leaves the earlier file as it was. Writers get a Python file
    object so that a full disk is an OSError here (torch.jit.save to a path aborts the process instead).
    """
    path, tmp = Path(path), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        with open(tmp, "wb") as f:  # a named file: onnx.save looks at f.name
            write(f)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; outputs are ordinary files
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(f"cannot write '{path}': {e.strerror or e}") from e
    finally:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)


def save_json(obj, path):
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def save_text(text, path):
    atomic_write(path, lambda f: f.write(text.encode()))


def torch_save(obj, path):
    """torch.save (torch.jit.save for TorchScript) into memory, then atomic_write: torch's zip writer turns a
    full disk into an opaque RuntimeError, or aborts, so it never writes to the file itself."""
    buffer = io.BytesIO()
    (torch.jit.save if isinstance(obj, torch.jit.ScriptModule) else torch.save)(obj, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def check_finite(model, what, hint):
    """Diverged unless model's weights, BN statistics and quantization scales are all finite, so that nothing is
    converted, exported or saved from a broken model. Observers' running min/max are skipped: one that never saw
    data (a skip_add of a block without a residual) holds +-inf by design."""
    for name, t in model.state_dict().items():
        if not isinstance(t, torch.Tensor) or name.endswith(("min_val", "max_val")):
            continue
        if t.is_quantized:
            per_channel = t.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric)
            t = t.q_per_channel_scales() if per_channel else torch.tensor(t.q_scale())
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise Diverged(f"{what} holds non-finite values ({name}); {hint}")


# ---------------------------------------------------------------- data

def find_layout(data_dir):
    """'official' (torchvision's cifar-10-batches-py), 'folder' (train/<class>/*) or None."""
    data_dir = Path(data_dir)
    if (data_dir / "cifar-10-batches-py").is_dir():
        return "official"
    if (data_dir / "train").is_dir() or (data_dir / "test").is_dir():
        return "folder"
    return None


def download_cifar10(data_dir):
    """torchvision's download of the official files; a clear UserError when offline."""
    data_dir = Path(data_dir)
    existed = data_dir.exists()
    if existed and not data_dir.is_dir():
        raise UserError(f"--data-dir '{data_dir}' is a file, not a folder")
    # The repo's data/ holds a .gitkeep, and a failed download may have left torchvision's archive behind.
    if existed and any(not p.name.startswith(".") and p.name != "cifar-10-python.tar.gz" for p in data_dir.iterdir()):
        raise UserError(f"'{data_dir}' holds neither CIFAR-10 layout: expected torchvision's "
                        f"'cifar-10-batches-py/' or an image folder with 'train/' and 'test/'")
    try:
        CIFAR10(str(data_dir), train=True, download=True)
    except Exception as e:  # URLError, timeouts, bad checksum: all end the same way for the user
        if not existed:
            shutil.rmtree(data_dir, ignore_errors=True)
        raise UserError(f"no CIFAR-10 found in '{data_dir}' and the download failed ({type(e).__name__}: {e}); "
                        f"put torchvision's 'cifar-10-batches-py/' or an image folder 'train/<class>/*.png|jpg', "
                        f"'test/<class>/*' there, or point --data-dir / CIFAR10_DIR at a copy") from None


def _decode_folder(split_dir):
    """Decode an ImageFolder split once into uint8 (N, 32, 32, 3) plus CIFAR-10 labels."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if classes != CLASSES:
        missing = sorted(set(CLASSES) - set(classes))
        extra = sorted(set(classes) - set(CLASSES))
        raise UserError(f"'{split_dir}' must hold exactly the 10 CIFAR-10 class folders; "
                        f"missing: {missing or 'none'}, unexpected: {extra or 'none'}")
    try:
        ds = ImageFolder(str(split_dir))
    except FileNotFoundError:  # raised when a class folder holds no image file
        raise UserError(f"'{split_dir}' has no images in at least one class folder") from None
    images = np.empty((len(ds.samples), 32, 32, 3), np.uint8)
    for i, (path, _) in enumerate(tqdm(ds.samples, desc=f"decode {split_dir.name}", leave=False,
                                       mininterval=1, disable=None)):  # no bar in logs
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
        except Exception as e:
            raise UserError(f"cannot decode image '{path}': {type(e).__name__}") from None
        if arr.shape != (32, 32, 3):
            raise UserError(f"image '{path}' is {arr.shape[1]}x{arr.shape[0]}, CIFAR-10 images are 32x32")
        images[i] = arr
    return images, np.asarray(ds.targets, np.int64)


def _folder_key(split_dir):
    """Cache key: the folder's absolute path, file count and total size."""
    files = [p for p in Path(split_dir).rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    return hashlib.sha1(f"{Path(split_dir).resolve()}|{len(files)}|{size}".encode()).hexdigest()[:16]


def load_split(data_dir, train, cache_dir=DEFAULT_CACHE_DIR):
    """One split as (uint8 tensor (N, 32, 32, 3), int64 labels); image folders are decoded once and cached."""
    data_dir, split = Path(data_dir), "train" if train else "test"
    if find_layout(data_dir) == "official":
        try:
            ds = CIFAR10(str(data_dir), train=train, download=False)
        except Exception as e:
            raise UserError(f"'{data_dir / 'cifar-10-batches-py'}' is incomplete or corrupt ({e})") from None
        images, labels = ds.data, np.asarray(ds.targets, np.int64)
    else:
        split_dir = data_dir / split
        if not split_dir.is_dir():
            raise UserError(f"image folder '{data_dir}' has no '{split}/' split")
        cache = Path(cache_dir) / f"{split}-{_folder_key(split_dir)}.npz"
        if cache.exists():
            with np.load(cache) as z:
                images, labels = z["images"], z["labels"]
        else:
            images, labels = _decode_folder(split_dir)
            try:
                atomic_write(cache, lambda f: np.savez(f, images=images, labels=labels))
            except WriteError as e:  # a read-only cache only costs time
                print(f"warning: {e} (decode cache); the run goes on")
    if len(labels) == 0:
        raise UserError(f"the {split} split in '{data_dir}' is empty")
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
    number of processes. A last global batch too small to give every process 2 images (BatchNorm) is dropped.
    """

    def __init__(self, images, labels, batch_size, seed, device, max_batches=0, padding=4, cutout=0,
                 rank=None, world=None):
        self.images, self.labels = images.to(device), labels.to(device)
        self.batch_size, self.seed, self.max_batches = batch_size, seed, max_batches
        self.padding, self.cutout = padding, cutout
        self.rank = get_rank() if rank is None else rank
        self.world = get_world_size() if world is None else world
        self.epoch, self.data_seconds = 0, 0.0  # a resumed run sets epoch to the epochs already done

    def __len__(self):
        step, rest = self.batch_size * self.world, len(self.labels) % (self.batch_size * self.world)
        smallest = 1 if self.world == 1 else 2 * self.world  # a last batch must give each process 2 images
        n = len(self.labels) // step + (rest >= smallest)
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


# ---------------------------------------------------------------- train / eval

class LossGuard:
    """Tells a training stage to stop when its loss is not finite or has grown past factor x its first batch's
    loss (at least factor x ln(classes), the loss of a uniform guess). Works on the loss value the loop already
    reads back, so it costs nothing on the step."""

    def __init__(self, classes=10, factor=10.0):
        self.floor, self.factor, self.limit = math.log(classes), factor, None

    def __call__(self, loss):
        if self.limit is None:
            self.limit = self.factor * max(self.floor, loss)
        return math.isfinite(loss) and loss <= self.limit


def train_one_epoch(model, batches, optimizer, scheduler, criterion, device, desc, guard):
    """One pass over batches; returns (mean loss, train accuracy, images/s, data share of the time), all of the
    global batches under torchrun (model: then the DistributedDataParallel wrapper).

    guard: a LossGuard; a batch it rejects raises Diverged before the optimizer steps on that loss.
    """
    model.train()
    batches.data_seconds = 0.0
    loss_sum, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    bar = tqdm(batches, desc=desc, leave=False, mininterval=1, dynamic_ncols=True, disable=None)  # no bar in logs
    for i, (x, y) in enumerate(bar, 1):
        out = model(x.to(device, non_blocking=True))
        loss = criterion(out, y)
        value, n, hits = loss.item(), len(y), (out.argmax(1) == y).sum().item()
        if get_world_size() > 1:  # the global batch's loss: every process takes the same guard decision
            value, n, hits, local = *all_reduce_stats(value * n, n, hits), n
            value /= n
            loss = loss * (local * get_world_size() / n)  # DDP's mean of the shares = the global batch's mean
        if not guard(value):
            bar.close()
            raise Diverged(f"loss {value:.4g} in batch {i}/{len(batches)}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        loss_sum += value * n
        correct += hits
        seen += n
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", refresh=False)
    seconds = time.perf_counter() - start
    return loss_sum / seen, correct / seen, seen / seconds, batches.data_seconds / seconds


@torch.no_grad()
def predict(model, images, device="cpu", batch_size=500):
    """Predicted classes for uint8 NHWC images, in eval mode."""
    model.eval()
    return torch.cat([model(normalize(images[i:i + batch_size]).to(device)).argmax(1).cpu()
                      for i in range(0, len(images), batch_size)])


def accuracy(model, data, device="cpu", sharded=False):
    """Top-1 on data; sharded: every process of a torchrun job predicts its part and the counts are summed."""
    images, labels = data
    if not sharded or get_world_size() == 1:
        return (predict(model, images, device) == labels).float().mean().item()
    part = torch.arange(len(labels)).tensor_split(get_world_size())[get_rank()]
    hits = (predict(model, images[part], device) == labels[part]).sum().item()
    return all_reduce_stats(hits)[0] / len(labels)


def top1(preds, labels):
    return (preds == labels).float().mean().item()


def load_state_dict(path, model):
    """A float/QAT state_dict for model, loaded safely (weights_only) and checked against it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"cannot load '{path}' as a state_dict: {type(e).__name__}") from None
    expected = model.state_dict()
    if not isinstance(state, dict) or set(state) != set(expected) or any(
            getattr(state[k], "shape", None) != v.shape for k, v in expected.items()):
        raise UserError(f"'{path}' is not a state_dict of this model ({type(model).__name__}, 10 classes)")
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad:
        raise UserError(f"'{path}' holds non-finite values ({bad})")
    return state


# ---------------------------------------------------------------- distributed (torchrun)

def get_rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_stats(*values):
    """Sums of a few numbers over the processes of the job (float64, so that counts stay exact)."""
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_buffers(model):
    """Rank 0's buffers (BN statistics, quantization ranges) on every process. DDP broadcasts them before each
    forward only, so after an epoch's last step every process holds its own update; this makes them equal."""
    if get_world_size() > 1:
        for b in model.buffers():
            dist.broadcast(b, 0)


def live_taps(conv, size):
    """Per spatial dim, the (first, last) kernel tap of conv that meets the input, not only its zero padding, on a
    size x size map."""
    taps = []
    for k, s, p in zip(conv.kernel_size, conv.stride, conv.padding):
        live = [t for t in range(k) if any(0 <= o * s + t - p < size for o in range((size + 2 * p - k) // s + 1))]
        taps.append((live[0], live[-1]))
    return taps


def _cut_conv(x, weight, bias, taps, stride, padding, groups):
    (a, b), (c, d) = taps
    return F.conv2d(x, weight[:, :, a:b + 1, c:d + 1], bias, stride, (padding[0] - a, padding[1] - c), 1, groups)


@contextlib.contextmanager
def dead_taps_cut(model, example):
    """Within the block, every Conv2d of model (QAT's fused, fake-quantized ones too) whose kernel reaches past its
    input map into the zero padding only (ResNet18's 3x3 convolutions on its 2x2 and 1x1 maps) runs with those taps
    cut from its kernel: the same outputs and gradients (a dead tap's gradient is 0 either way) for up to 9x less
    work, where oneDNN's AVX2 kernels are slowest (docs/experiments.md). Parameters and state_dict stay as they
    are. Yields the names cut.

    example: an input batch of the shape training uses. The map sizes come from one forward pass of a copy of
    model, so that nothing of model's state (BN statistics, quantization ranges) moves."""
    probe, sizes = copy.deepcopy(model).eval(), {}
    for name, m in probe.named_modules():
        if (isinstance(m, torch.nn.Conv2d) and m.padding_mode == "zeros" and isinstance(m.padding, tuple)
                and m.dilation == (1, 1)):
            m.register_forward_pre_hook(lambda m, x, name=name: sizes.update({name: x[0].shape[-1]}))
    with torch.no_grad():
        probe(example)
    cut = {}
    for name, m in model.named_modules():
        if name in sizes and (taps := live_taps(m, sizes[name])) != [(0, k - 1) for k in m.kernel_size]:
            # Conv2d.forward calls self._conv_forward(input, weight, bias): an instance attribute takes its place
            m._conv_forward = functools.partial(_cut_conv, taps=taps, stride=m.stride, padding=m.padding,
                                                groups=m.groups)
            cut[name] = m
    try:
        yield list(cut)
    finally:
        for m in cut.values():
            del m._conv_forward


def distribute(model, device):
    """model wrapped in DistributedDataParallel under torchrun (the wrapper shares model's parameters), else model."""
    if get_world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    from torch.ao.quantization import FakeQuantizeBase
    # Kernels with a size-1 dimension (1x1, depthwise) are the same memory in channels_last and contiguous strides.
    # DDP's buckets take the parameter's strides and want the grad's to match: conv grads come in channels_last,
    # QAT's (of the scaled, fake-quantized weight) in contiguous strides.
    if any(isinstance(m, FakeQuantizeBase) for m in model.modules()):
        for param in model.parameters():
            if param.dim() == 4 and param.is_contiguous() and param.is_contiguous(memory_format=torch.channels_last):
                param.data = param.data.clone(memory_format=torch.contiguous_format)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True)


class CPUSyncBatchNorm(torch.nn.BatchNorm2d):
    """BatchNorm2d with the statistics of the global batch on the CPU (gloo): torch's nn.SyncBatchNorm runs on
    GPUs only (its kernels are CUDA ones, and DDP refuses it on CPU modules).

    The batch mean and variance come from sums over all processes; the functional all_reduce is differentiable
    (its backward all-reduces the gradient), so autograd gives the backward nn.SyncBatchNorm computes. Eval mode
    is BatchNorm2d's.
    """

    def forward(self, x):
        if not self.training or get_world_size() == 1:
            return super().forward(x)
        # torch.distributed.nn.functional.all_reduce is deprecated in favour of this one
        from torch.distributed._functional_collectives import all_reduce
        total = lambda t: all_reduce(t, "sum", dist.group.WORLD)
        dims, shape = [0, 2, 3], (1, -1, 1, 1)
        count = total(torch.tensor([float(x.numel() // x.shape[1])]))
        mean = total(x.sum(dims)) / count  # two passes, as the single-process kernel, for equal rounding
        var = total(((x - mean.view(shape)) ** 2).sum(dims)) / count
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1), self.momentum)
        return (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps) * self.weight.view(shape) \
            + self.bias.view(shape)


def convert_sync_batchnorm(model, device):
    """--sync-bn: model's BatchNorm2d layers (in place) as nn.SyncBatchNorm on CUDA, CPUSyncBatchNorm on the CPU."""
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for m in model.modules():
        if type(m) is torch.nn.BatchNorm2d:
            m.__class__ = CPUSyncBatchNorm  # the same parameters and buffers; only forward differs
    return model


# ---------------------------------------------------------------- ONNX

def export_onnx(model, name, opset=17):
    """Export with the TorchScript exporter (in memory), check, simplify with onnxsim.

    Returns (the ONNX ModelProto, {'opset', 'simplified', 'note'}); nothing is written, so a caller saves
    (save_onnx) only what it has verified. A failed simplification keeps the checked unsimplified graph.
    """
    import onnx
    import onnxsim
    buffer = io.BytesIO()
    torch.onnx.export(model.eval(), torch.randn(1, 3, 32, 32), buffer, dynamo=False, opset_version=opset,
                      input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    graph = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(graph, full_check=True)
    info = dict(opset=opset, simplified=False, note="")
    try:
        simple, ok = onnxsim.simplify(graph)
        if not ok:
            raise RuntimeError("onnxsim's check found different outputs")
        onnx.checker.check_model(simple, full_check=True)
        graph, info["simplified"] = simple, True
    except Exception as e:
        info["note"] = f"onnxsim failed ({type(e).__name__}: {e}); kept the unsimplified graph"
        print(f"warning: {name}: {info['note']}")
    return graph, info


INT4_OPSET = 21  # the first opset whose DequantizeLinear takes INT4


def pack_int4_weights(graph):
    """A copy of a QDQ int8 graph with its constant int8 weights stored as INT4 initializers, two a byte.

    Packs every DequantizeLinear input that is a constant int8 tensor within [-8, 7] with zero point 0
    (--weight-bits 4); the values, and so the outputs, do not change. Returns (graph, number of tensors packed).
    """
    import ml_dtypes  # onnx's own dependency for its 4-bit types
    import onnx
    from onnx import numpy_helper
    graph = onnx.version_converter.convert_version(graph, INT4_OPSET)
    constants = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.graph.node
                 if n.op_type == "Constant" and n.attribute[0].name == "value"}
    packed, initializers = 0, {}
    for node in graph.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 3:
            continue
        weight, zero_point = constants.get(node.input[0]), constants.get(node.input[2])
        if (weight is None or zero_point is None or weight.dtype != np.int8 or zero_point.any()
                or weight.min() < -8 or weight.max() > 7):
            continue
        for i, values in ((0, weight), (2, zero_point)):  # DequantizeLinear wants both in one type
            name = f"{node.input[i]}_int4"
            initializers.setdefault(name, numpy_helper.from_array(values.astype(ml_dtypes.int4), name))
            node.input[i] = name
        packed += 1
    graph.graph.initializer.extend(initializers.values())
    used = {name for n in graph.graph.node for name in n.input} | {o.name for o in graph.graph.output}
    kept = [n for n in graph.graph.node if n.op_type != "Constant" or n.output[0] in used]
    del graph.graph.node[:]
    graph.graph.node.extend(kept)
    graph.ir_version = max(graph.ir_version, 10)  # INT4 needs IR version 10
    onnx.checker.check_model(graph, full_check=True)
    return graph, packed


def save_onnx(graph, path):
    import onnx
    atomic_write(path, lambda f: onnx.save(graph, f))


def ort_session(model, threads):
    """An ONNX Runtime CPU session for a file path or an in-memory ModelProto."""
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    source = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def ort_predict(model, images, threads, batch_size=500):
    session = ort_session(model, threads)
    return torch.cat([torch.from_numpy(session.run(None, {"input": normalize(images[i:i + batch_size])
                                                          .contiguous().numpy()})[0]).argmax(1)
                      for i in range(0, len(images), batch_size)])


# ---------------------------------------------------------------- deploy

def openvino_compile(path, threads, batch, hint="LATENCY", precision=None):
    """An OpenVINO CPU model compiled from an ONNX file for a fixed batch size (static shapes ran faster than the
    file's dynamic batch: docs/experiments.md). precision: INFERENCE_PRECISION_HINT; by default OpenVINO runs fp32
    layers in bf16 on CPUs that have it. Returns (compiled model, settings as OpenVINO reports them)."""
    import openvino as ov
    core = ov.Core()
    model = core.read_model(str(path))
    model.reshape([batch, 3, 32, 32])
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": hint}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(model, "CPU", config)
    settings = dict(hint=hint, threads=threads, precision=compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name(),
                    streams=int(compiled.get_property("NUM_STREAMS")), static_batch=True)
    return compiled, settings


def openvino_runner(compiled):
    """fn(x) -> logits: one synchronous request (the latency hint's way)."""
    request = compiled.create_infer_request()
    return lambda x: request.infer({0: x.numpy()})[0]


def openvino_parallel_runner(compiled, parts):
    """fn(x) -> logits: x split into `parts` equal requests run at once on the throughput hint's streams."""
    import openvino as ov
    queue, out = ov.AsyncInferQueue(compiled, parts), [None] * parts
    queue.set_callback(lambda request, i: out.__setitem__(i, request.get_output_tensor(0).data.copy()))

    def run(x):
        for i, chunk in enumerate(x.numpy().reshape(parts, -1, *x.shape[1:])):
            queue.start_async({0: chunk}, i)
        queue.wait_all()
        return np.concatenate(out)
    return run


def predict_fixed_batch(run, images, batch):
    """Predicted classes from run(x) -> logits, always called with exactly `batch` images (the last batch padded
    with zeros), as a model compiled for one shape needs."""
    preds = []
    for i in range(0, len(images), batch):
        x = normalize(images[i:i + batch])
        n = len(x)
        x = torch.cat([x, x.new_zeros(batch - n, *x.shape[1:])]).contiguous()
        preds.append(torch.as_tensor(np.asarray(run(x)))[:n].argmax(1))
    return torch.cat(preds)


def recommend(deploy, batch_sizes):
    """The fastest *verified* form of each precision at each batch size, and the best int8 against the best fp32.

    deploy: report["deploy"] rows. Returns ({batch: {precision: name}}, {batch: fp32 median / int8 median})."""
    recommended, ratio = {}, {}
    for b in map(str, batch_sizes):
        best = {}
        for precision in ("int8", "fp32"):
            ok = [f for f in deploy if f["precision"] == precision and f["verified"] and b in f["latency_ms"]]
            if ok:
                best[precision] = min(ok, key=lambda f: f["latency_ms"][b]["median"])
        recommended[b] = {p: f["name"] for p, f in best.items()}
        if len(best) == 2:
            ratio[b] = best["fp32"]["latency_ms"][b]["median"] / best["int8"]["latency_ms"][b]["median"]
    return recommended, ratio


# ---------------------------------------------------------------- benchmark

def _call_times(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return times


def _stats(times):
    return dict(median=float(np.median(times)), p90=float(np.percentile(times, 90)))


def time_it(fn, warmup, runs):
    """Median and 90th percentile of runs timed calls, in ms, after warmup calls."""
    for _ in range(warmup):
        fn()
    return _stats(_call_times(fn, runs))


def time_interleaved(fns, warmup, runs, rounds=5, settle_s=0.0):
    """time_it for every fn of {name: fn} in one process: after warm-up, `rounds` rounds in each of which every fn
    makes runs / rounds timed calls in turn, so that a slow spell of the machine touches all forms alike.

    Each call is timed on its own (time.perf_counter): torch.utils.benchmark's blocked_autorange reports means of
    blocks of calls, which hide the per-call tail that the p90 is for. Before each fn's calls of a round: a pause of
    settle_s (the thread pools of the runtime timed before stop spinning) and one untimed call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            time.sleep(settle_s)
            fn()
            times[name] += _call_times(fn, max(1, math.ceil(runs / rounds)))
    return {name: _stats(t) for name, t in times.items()}


def environment(threads):
    import onnx
    import onnxruntime
    import torchvision
    try:
        openvino = importlib.metadata.version("openvino")
    except importlib.metadata.PackageNotFoundError:
        openvino = None
    return dict(torch=torch.__version__, torchvision=torchvision.__version__, onnx=onnx.__version__,
                onnxruntime=onnxruntime.__version__, openvino=openvino, threads=threads, cores=os.cpu_count(),
                quantized_engine=torch.backends.quantized.engine, cpu=platform_cpu(),
                cpu_capability=torch.backends.cpu.get_cpu_capability(), vnni=cpu_has_vnni(),
                python=platform.python_version())


def cpuinfo_field(name, cpuinfo="/proc/cpuinfo"):
    """The value of the first `name` line of /proc/cpuinfo, or None where there is none (not Linux, ARM fields)."""
    try:
        line = next(l for l in Path(cpuinfo).read_text().splitlines() if l.split(":")[0].strip() == name)
    except (OSError, StopIteration):
        return None
    return line.split(":", 1)[1].strip()


def cpu_has_vnni(cpuinfo="/proc/cpuinfo"):
    """Whether the CPU has int8 dot-product instructions (AVX512-VNNI or AVX-VNNI): they decide which int8 kernels
    win. None where cpuinfo cannot say."""
    flags = cpuinfo_field("flags", cpuinfo)
    return None if flags is None else bool({"avx512_vnni", "avx_vnni"} & set(flags.split()))


def platform_cpu():
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


# ---------------------------------------------------------------- report

WORST_LAYERS = 10  # report.md lists this many of each method's layers, lowest SQNR first


def report_markdown(r):
    """report.json as readable tables."""
    acc, sizes = r["accuracy"], [str(b) for b in r["args"]["bench_batch_sizes"]]
    lines = [f"# {r['model']} on CIFAR-10: float, QAT int8, ONNX", "",
             f"{r['epochs']} float epochs + {r['qat_epochs']} QAT epochs of {r['args']['qat_batches'] or 'all'} "
             f"batches on {r['device']}, {r.get('weight_bits', 8)}-bit weights; "
             f"torch {r['environment']['torch']}, {r['environment']['threads']} threads, "
             f"{r['environment']['cpu']}", "",
             "| model | top-1 | file (bytes) |", "|---|---|---|"]
    names = [("fp32", "fp32", "fp32"), ("PTQ int8", "ptq_int8", None), ("QAT fake-quant", "qat_fake_quant", None),
             ("QAT int8", "int8", "int8"), ("fp32 ONNX", "fp32_onnx", "fp32_onnx"),
             ("int8 ONNX", "int8_onnx", "int8_onnx"),
             ("int8 ONNX, weights stored in 4 bits", "int8_w4_onnx", "int8_w4_onnx")]
    for label, key, size in names:
        if key in acc:
            lines.append(f"| {label} | {acc[key]:.4f} | {r['model_size_bytes'].get(size, '')} |")
    if "qat_vs_ptq" in r:
        lines += ["", f"QAT int8 - PTQ int8: {r['qat_vs_ptq']:+.2f} points (one seed; README: QAT or PTQ for the "
                      f"seed spread)"]
    if r.get("agreement"):
        lines += ["", "| agreement (same predicted class) | share of test images |", "|---|---|"]
        lines += [f"| {k} | {v:.4f} |" for k, v in r["agreement"].items()]
    if r.get("layer_sqnr"):
        lines += ["", f"Per-layer quantization error: SQNR (dB) of each int8 conv/linear output against the BN-folded "
                  f"float model, on {r['layer_sqnr_images']} test images; the {WORST_LAYERS} worst layers "
                  f"(layer_sqnr.png: all)", ""]
        worst = [[method.upper(), row["layer"], f"{row['sqnr_db']:.1f}"] for method, rows in r["layer_sqnr"].items()
                 for row in sorted(rows, key=lambda row: row["sqnr_db"])[:WORST_LAYERS]]
        lines += markdown_table([["method", "layer", "SQNR dB"], *worst])
    if r.get("deploy"):
        ds = r["deploy_settings"]
        lines += ["", f"Deployment matrix: latency in ms per batch, median (p90) of {ds['runs']} calls in "
                  f"{ds['rounds']} interleaved rounds after {ds['warmup']} warm-up calls, {ds['threads']} threads; "
                  f"top-1 and agreement (same class as the reference: int8 {ds['references']['int8']}, otherwise "
                  f"{ds['references']['fp32']}) on {ds['images']} test images", ""]
        lines += markdown_table(deploy_rows(r, p90=True))
        lines += ["", *[f"- {line}" for line in recommendation_lines(r)]]
        lines += [f"- note: {n}" for n in r.get("deploy_notes", [])]
        lines += ["", "| speed-up | " + " | ".join(f"batch {b}" for b in sizes) + " |", "|---" * (len(sizes) + 1) + "|"]
        lines += [f"| {k} | " + " | ".join(f"{v[b]:.2f}x" if b in v else "-" for b in sizes) + " |"
                  for k, v in r["speedup"].items()]
    if r.get("history"):
        lines += ["", "| stage | epoch | loss | train acc | test acc | img/s | data share | s |", "|---" * 8 + "|"]
        lines += [f"| {h['stage']} | {h['epoch']} | {h['loss']:.4f} | {h['train_acc']:.4f} | {h['test_acc']:.4f} "
                  f"| {h['images_per_s']:.0f} | {h['data_share']:.1%} | {h['seconds']:.0f} |" for h in r["history"]]
    lines += ["", "Wall time per stage (s): " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items())]
    return "\n".join(lines) + "\n"


def plot_curves(history, path):
    """Loss and test accuracy per epoch, float then QAT."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for stage in ("fp32", "qat"):
        rows = [(i + 1, h) for i, h in enumerate(history) if h["stage"] == stage]
        if rows:
            x = [i for i, _ in rows]
            ax1.plot(x, [h["loss"] for _, h in rows], "o-", label=f"{stage} train loss")
            ax2.plot(x, [h["test_acc"] for _, h in rows], "o-", label=f"{stage} test top-1")
            ax2.plot(x, [h["train_acc"] for _, h in rows], "--", label=f"{stage} train top-1")
    for ax, title in ((ax1, "loss"), (ax2, "accuracy")):
        ax.set_xlabel("epoch (float, then QAT)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_deploy(deploy, path):
    """Latency of every form at each batch size, fastest first; unverified forms hatched."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = sorted({b for f in deploy for b in f["latency_ms"]}, key=int)
    colors = {"int8": "tab:blue", "fp32": "tab:orange", "bf16": "tab:green"}
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 0.8 + 0.3 * len(deploy)), squeeze=False)
    for ax, b in zip(axes[0], sizes):
        rows = sorted((f for f in deploy if b in f["latency_ms"]), key=lambda f: f["latency_ms"][b]["median"])
        values = [f["latency_ms"][b]["median"] for f in rows]
        ax.barh([f["name"] for f in rows], values, color=[colors.get(f["precision"], "grey") for f in rows])
        for i, (f, v) in enumerate(zip(rows, values)):
            if not f["verified"]:
                ax.patches[i].set_hatch("//")
            ax.text(v, i, f" {v:.2f}" + ("" if f["verified"] else " (unverified)"), va="center", fontsize=8)
        ax.set_xlabel("ms per batch (median)")
        ax.set_title(f"batch {b} (blue int8, orange fp32, green bf16)", fontsize=10)
        ax.invert_yaxis()
        ax.set_xlim(0, max(values) * 1.35)
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def plot_layer_sqnr(layer_sqnr, path):
    """SQNR per quantized layer in network order, one line per method (PTQ, QAT)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = next(iter(layer_sqnr.values()))
    fig, ax = plt.subplots(figsize=(max(6, 0.16 * len(rows)), 4))
    for method, rows in layer_sqnr.items():
        ax.plot([row["sqnr_db"] for row in rows], "o-", ms=3, label=method.upper())
    ax.set_xticks(range(len(rows)), [row["layer"] for row in rows], rotation=90, fontsize=6)
    ax.set_ylabel("SQNR (dB) against the float model")
    ax.set_title("per-layer quantization error (higher is better)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def save_report(report, out, plots=False):
    """report.json, report.md and (at the end) the PNG plots, each written atomically."""
    out = Path(out)
    if plots and report["history"]:
        plot_curves(report["history"], out / "training_curves.png")
        report["artifacts"]["training_curves"] = "training_curves.png"
    if plots and report.get("layer_sqnr"):
        plot_layer_sqnr(report["layer_sqnr"], out / "layer_sqnr.png")
        report["artifacts"]["layer_sqnr_plot"] = "layer_sqnr.png"
    if plots and report.get("deploy"):
        plot_deploy(report["deploy"], out / "latency.png")
        report["artifacts"]["latency_plot"] = "latency.png"
    save_json(report, out / "report.json")
    save_text(report_markdown(report), out / "report.md")


def summary(r):
    """The short console table: accuracy and file size of fp32, PTQ int8 and QAT int8, then speed-ups."""
    acc, size = r["accuracy"], r["model_size_bytes"]
    rows = [("fp32", acc.get("fp32"), size.get("fp32")), ("PTQ int8", acc.get("ptq_int8"), None),
            ("QAT int8", acc.get("int8"), size.get("int8")), ("int8 ONNX", acc.get("int8_onnx"), size.get("int8_onnx")),
            ("4-bit ONNX", acc.get("int8_w4_onnx"), size.get("int8_w4_onnx"))]
    lines = [f"{'':10s} {'top-1':>7s} {'file MB':>8s}"]
    lines += [f"{n:10s} {a:7.4f} {(f'{s / 1e6:.2f}' if s else '-'):>8s}" for n, a, s in rows if a is not None]
    if "qat_vs_ptq" in r:
        lines.append(f"QAT int8 - PTQ int8: {r['qat_vs_ptq']:+.2f} points")
    for k, v in r.get("speedup", {}).items():
        lines.append(f"speed-up {k}: " + ", ".join(f"{x:.2f}x at batch {b}" for b, x in v.items()))
    return "\n".join(lines)


def deploy_rows(r, p90=False):
    """The deployment matrix as rows of strings, header first."""
    sizes = [str(b) for b in r["args"]["bench_batch_sizes"]]
    ms = lambda v: "-" if v is None else f"{v['median']:.3f}" + (f" ({v['p90']:.3f})" if p90 else "")
    rows = [["form", "engine", "precision", *[f"batch {b} ms" for b in sizes], "top-1", "agreement", "verified"]]
    for f in r["deploy"]:
        rows.append([f["name"], f["engine"] or "-", f["precision"], *[ms(f["latency_ms"].get(b)) for b in sizes],
                     "-" if f["top1"] is None else f"{f['top1']:.4f}",
                     "-" if f["agreement"] is None else f"{f['agreement']:.4f}",
                     "yes" if f["verified"] else f"no: {f['note']}"])
    return rows


def markdown_table(rows):
    return ["| " + " | ".join(rows[0]) + " |", "|---" * len(rows[0]) + "|",
            *["| " + " | ".join(row) + " |" for row in rows[1:]]]


def deploy_table(r):
    """The deployment matrix for the console, in aligned columns."""
    rows = deploy_rows(r)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     + "  " + row[-1] for row in rows)


def recommendation_lines(r):
    """One line per batch size: the fastest verified int8 and fp32 forms and their ratio."""
    lines = []
    for b, pick in r.get("recommended", {}).items():
        latency = {f["name"]: f["latency_ms"][b]["median"] for f in r["deploy"] if b in f["latency_ms"]}
        parts = [f"{p} {pick[p]} ({latency[pick[p]]:.3f} ms)" if p in pick else f"no verified {p} form"
                 for p in ("int8", "fp32")]
        ratio = r["speedup"].get("best_int8_vs_best_fp32", {}).get(b)
        lines.append(f"recommended at batch {b}: {parts[0]}, {parts[1]}"
                     + (f": int8 {ratio:.2f}x faster than the best fp32" if ratio else ""))
    return lines
