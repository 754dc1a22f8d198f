"""Scratch check (issue 11): does DistributedDataParallel work with the ISNet heatmap double backward?

Trains the same model for a few ISNet steps three ways on the same global batches and compares
the final weights:

* ``single``: one process, the whole global batch;
* ``manual``: N gloo processes, each with 1/N of every batch, gradients all-reduced by hand after
  the backward and divided by N (``fisnet.train.Trainer`` with ``ddp=False``);
* ``ddp``: N gloo processes, the model wrapped in ``torch.nn.parallel.DistributedDataParallel``
  (its reducer's hooks all-reduce the gradients during the final backward) and ``ISNet`` built
  around the DDP module, so the forward and the heatmap backward (``autograd.grad`` with
  ``create_graph=True``, with respect to activations) run through it (what ``fisnet.train.Trainer``
  does under torchrun by default).

``--trainer`` runs the same three ways through ``fisnet.train.Trainer`` itself (``ddp=True`` /
``ddp=False`` under N processes, one process), one epoch of ``--steps`` global batches.

Without BatchNorm the three must agree up to float summation order (checked in float64, the
default: in float32 the rounding differences grow step by step through these steps).  With BatchNorm each process
normalises with its own half-batch statistics, so ``manual`` and ``ddp`` must agree with each other
but not with ``single`` (the same holds for plain training).  Also times the steps (noisy on a
shared CPU).

    python bench/ddp_check.py                      # 2 processes, selective, no BatchNorm and BatchNorm
    python bench/ddp_check.py --variant dual --steps 5
    python bench/ddp_check.py --trainer            # through fisnet.train.Trainer
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))


def _data(args):
    g = torch.Generator().manual_seed(1)
    B, S = args.batch, args.size
    xs = torch.rand(args.steps, B, 3, S, S, generator=g)
    ys = torch.randint(0, args.classes, (args.steps, B), generator=g)
    ms = torch.zeros(args.steps, B, 1, S, S)
    ms[..., S // 4: 3 * S // 4, S // 4: 3 * S // 4] = 1
    return xs, ms, ys


def _model(args, bn):
    from fisnet import models
    torch.manual_seed(0)
    if args.model == "small_cnn":
        return models.small_cnn(num_classes=args.classes, in_channels=3, width=args.width, batchnorm=bn)
    if not bn:
        raise SystemExit("--model other than small_cnn always has BatchNorm; use small_cnn for the no-BN check")
    return models.build(args.model, num_classes=args.classes, in_channels=3)


def _train(args, bn, mode, rank=0, world=1):
    """Run args.steps steps; returns (final state dict, ms per step list)."""
    from fisnet import ISNet, ISNetLoss
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    model = _model(args, bn).to(dtype)
    model.train()
    wrapped = model
    if mode == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    net = ISNet(wrapped, args.variant, generator=torch.Generator().manual_seed(0))
    M = 2 if args.variant == "dual" else 1
    crit = ISNetLoss(P=0.7, cuts={"input": [[0.05, 2.0]] * M}, check=False)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    xs, ms, ys = _data(args)
    per = args.batch // world
    sl = slice(rank * per, (rank + 1) * per)
    times = []
    for s in range(args.steps):
        x, m, y = xs[s, sl].to(dtype), ms[s, sl].to(dtype), ys[s, sl]
        t0 = time.perf_counter()
        out = net(x, y)
        loss = crit(out, y, m)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if mode == "manual":
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat)
            flat /= world
            off = 0
            for g in grads:
                g.copy_(flat[off:off + g.numel()].view_as(g))
                off += g.numel()
        opt.step()
        times.append(1e3 * (time.perf_counter() - t0))
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, times


def _trainer(args, bn, ddp):
    """A fisnet.train.Trainer over args.steps global batches of the same data as _train."""
    from fisnet.data import MaskedImageDataset
    from fisnet.train import Trainer, TrainConfig
    dtype = getattr(torch, args.dtype)
    xs, ms, ys = _data(args)
    ds = MaskedImageDataset(xs.flatten(0, 1).to(dtype), ms.flatten(0, 1).to(dtype), ys.flatten())
    M = 2 if args.variant == "dual" else 1
    cfg = TrainConfig(epochs=1, variant=args.variant, batch_size=args.batch, lr=args.lr, momentum=0.9, clip=None,
                      P=0.7, device="cpu", progress=False, verbose=False, ddp=ddp)
    return Trainer(_model(args, bn).to(dtype), ds, None, None, cfg, cuts={"input": [[0.05, 2.0]] * M})


def _trainer_worker(rank, world, port, args, bn, path):
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        res = {}
        for mode in ("ddp", "manual"):
            t = _trainer(args, bn, mode == "ddp")
            t0 = time.perf_counter()
            t.fit()
            res[mode] = {"state": {k: v.detach().clone() for k, v in t.model.state_dict().items()},
                         "times": [1e3 * (time.perf_counter() - t0) / args.steps]}
        if rank == 0:
            torch.save(res, path)
    finally:
        dist.destroy_process_group()


def _worker(rank, world, port, args, bn, mode, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        state, times = _train(args, bn, mode, rank, world)
        if rank == 0:
            torch.save({"state": state, "times": times}, path)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _compare(a, b):
    """max |a - b| over the parameters (not the BN running statistics) and max |a|."""
    diff = scale = 0.0
    for k in a:
        if "running" in k or "num_batches" in k:
            continue
        diff = max(diff, float((a[k].double() - b[k].double()).abs().max()))
        scale = max(scale, float(a[k].double().abs().max()))
    return diff, scale


def _median(xs):
    xs = sorted(xs[1:] or xs)  # the first step warms up
    return xs[len(xs) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8, help="global batch (divisible by --world)")
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--width", type=int, default=8)
    ap.add_argument("--classes", type=int, default=4)
    ap.add_argument("--model", default="small_cnn")
    ap.add_argument("--variant", default="selective", choices=("original", "selective", "stochastic", "dual"))
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                    help="float64 (default) separates exactness from float32 rounding, which these steps amplify")
    ap.add_argument("--bn", choices=("no", "yes", "both"), default="both")
    ap.add_argument("--trainer", action="store_true", help="through fisnet.train.Trainer (ddp=True / ddp=False)")
    args = ap.parse_args(argv)
    if args.batch % args.world:
        ap.error(f"--batch {args.batch} must be divisible by --world {args.world}")
    if args.variant == "stochastic":
        print("note: stochastic draws classes per process from the same seed, so its draws differ "
              "between 1 and N processes; the weights are not expected to match")
    ok = True
    for bn in {"no": [False], "yes": [True], "both": [False, True]}[args.bn]:
        if args.trainer:
            torch.set_num_threads(1)
            t = _trainer(args, bn, True)
            t0 = time.perf_counter()
            t.fit()
            single, t1 = t.model.state_dict(), [1e3 * (time.perf_counter() - t0) / args.steps]
            with tempfile.TemporaryDirectory() as d:
                path = os.path.join(d, "state.pt")
                mp.spawn(_trainer_worker, args=(args.world, _free_port(), args, bn, path), nprocs=args.world,
                         join=True)
                res = torch.load(path, weights_only=True)
        else:
            single, t1 = _train(args, bn, "single")
            res = {}
            for mode in ("manual", "ddp"):
                with tempfile.TemporaryDirectory() as d:
                    path = os.path.join(d, "state.pt")
                    mp.spawn(_worker, args=(args.world, _free_port(), args, bn, mode, path), nprocs=args.world,
                             join=True)
                    res[mode] = torch.load(path, weights_only=True)
        d_ms, scale = _compare(single, res["manual"]["state"])
        d_ds, _ = _compare(single, res["ddp"]["state"])
        d_dm, _ = _compare(res["manual"]["state"], res["ddp"]["state"])
        moved, _ = _compare(single, {k: v for k, v in _model(args, bn).state_dict().items()})
        print(f"{'Trainer, ' if args.trainer else ''}BatchNorm {'yes' if bn else 'no'}: {args.world} processes, {args.variant}, {args.steps} steps, "
              f"global batch {args.batch}, {args.dtype}; max |w| {scale:.3g}, weights moved up to {moved:.3g}")
        print(f"  max |single - manual| = {d_ms:.3g}")
        print(f"  max |single - ddp|    = {d_ds:.3g}")
        print(f"  max |manual - ddp|    = {d_dm:.3g}")
        tm, td = _median(res["manual"]["times"]), _median(res["ddp"]["times"])
        print(f"  ms/step (median after the first): single {_median(t1):.1f}, manual {tm:.1f}, ddp {td:.1f} (rank 0)")
        # manual and ddp all-reduce the same gradients: equal up to rounding.  single vs N: equal up
        # to rounding in float64; in float32 the rounding differences of the summation order grow
        # step by step (measured ~30x per step at lr 0.05), so only float64 is checked.
        tol = (1e-9 if args.dtype == "float64" else 1e-5) * max(scale, 1.0)
        if d_dm > tol or (not bn and args.variant != "stochastic" and args.dtype == "float64"
                          and max(d_ms, d_ds) > tol):
            ok = False
    print("result:", "weights agree" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
