"""torchrun: global batches shared between processes, batch norm over the global batch, rank-0 writes, one error."""
import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import utils
from conftest import ROOT, write_folder


def test_the_shares_of_a_global_batch_are_the_single_process_batch():
    images = torch.randint(0, 256, (107, 32, 32, 3), dtype=torch.uint8)
    labels = torch.arange(107)
    one = list(utils.Batches(images, labels, 24, 3, "cpu", padding=4, cutout=8))
    for world in (2, 3):
        shares = [list(utils.Batches(images, labels, 24 // world, 3, "cpu", padding=4, cutout=8, rank=r,
                                     world=world)) for r in range(world)]
        assert all(len(s) == len(one) for s in shares)  # 107 = 4 x 24 + 11: the last batch is kept
        for step, (x, y) in enumerate(one):
            assert torch.equal(torch.cat([s[step][0] for s in shares]), x)  # same images, same augmentation
            assert torch.equal(torch.cat([s[step][1] for s in shares]), y)


def test_a_last_global_batch_too_small_for_two_images_per_process_is_dropped():
    images, labels = torch.zeros(51, 32, 32, 3, dtype=torch.uint8), torch.arange(51)
    assert len(utils.Batches(images, labels, 25, 0, "cpu", rank=0, world=1)) == 3  # 1 image left: kept alone
    assert len(utils.Batches(images, labels, 25, 0, "cpu", rank=0, world=2)) == 1  # 1 image for 2 processes
    assert len(utils.Batches(torch.zeros(54, 32, 32, 3, dtype=torch.uint8), torch.arange(54), 25, 0, "cpu",
                             rank=1, world=2)) == 2  # 4 images left: 2 per process


def loss_weights(x):
    """A loss that weights every element differently, so that every gradient path counts."""
    return torch.arange(x.numel()).view_as(x).sin()


def sync_bn_worker(rank, world, init_file, x, result):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
    bn = utils.convert_sync_batchnorm(bn, torch.device("cpu"))
    share = x.tensor_split(world)[rank].clone().requires_grad_()
    out = bn(share)
    (out * loss_weights(x).tensor_split(world)[rank]).sum().backward()
    dist.all_reduce(bn.weight.grad)
    result[rank] = dict(out=out.detach(), x_grad=share.grad, w_grad=bn.weight.grad,
                        running_var=bn.running_var.clone())
    dist.destroy_process_group()


def test_cpu_sync_batchnorm_is_batchnorm_of_the_whole_batch():
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(3)
    torch.nn.init.uniform_(bn.weight, 0.5, 1.5)
    xr = x.clone().requires_grad_()
    out = bn(xr)
    (out * loss_weights(x)).sum().backward()
    with tempfile.TemporaryDirectory() as d, mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(sync_bn_worker, args=(2, f"{d}/init", x, result), nprocs=2)
        shares = [result[r] for r in range(2)]
    close = lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert close(torch.cat([s["out"] for s in shares]), out.detach())
    assert close(torch.cat([s["x_grad"] for s in shares]), xr.grad)
    assert close(shares[0]["w_grad"], bn.weight.grad) and close(shares[0]["running_var"], bn.running_var)
    # the measure can fail: each half's own statistics are another normalisation
    assert not close(torch.nn.functional.batch_norm(x[:4], None, None, training=True), out.detach()[:4])
