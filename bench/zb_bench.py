"""The Zb first-layer rule alone, before/after (issue 11): CPU time (`time.process_time`, median of
interleaved repeats, 1 thread) and peak memory (`fisnet.bench_scaling.peak_step_bytes`) of
forward + backward of a scalar of the map, as the training step does, at the first layer of

  (a) small_cnn width 16: Conv2d(3, 16, 3, padding=1) + BatchNorm, 3x32x32, batch 32, M = 1
  (b) resnet18's stem: Conv2d(3, 64, 7, stride 2, padding 3) + BatchNorm, 3x128x128, batch 8, M = 1

Every configuration runs the same shared part: conv -> BatchNorm (training statistics) -> R_out
= relu(y) * G (G a leaf: the relevance the heatmap backward brings to the first ReLU) and a loss
term relu(y).mean() standing for the rest of the network.  `base` is that part alone; the Zb cost
of a configuration is its figure minus base's.

  ref       fold_batchnorm_as_used + rules._zb_relevance_reference (the code before this change)
  new       fold_batchnorm_for_zb (z_full = the BN output from conv_out) + zb_relevance(z_full=...)
  new_y     fold_batchnorm_as_used + zb_relevance(z_full=y), y the BN output as the forward kept it
            (a ReLU that is not in place)
  new_noz   fold_batchnorm_as_used + zb_relevance (z from a convolution of the input)
  new_div   as new, with PyTorch's division instead of rules.ZbRatio

Usage: python bench/zb_bench.py [--setting a,b] [--repeats N] [--configs base,ref,new,...]
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import fisnet.rules as rules
from fisnet.bench_scaling import peak_step_bytes
from fisnet.rules import LinearLayer, fold_batchnorm_as_used, fold_batchnorm_for_zb

SETTINGS = {
    "a": dict(cin=3, cout=16, k=3, stride=1, pad=1, size=32, batch=32),
    "b": dict(cin=3, cout=64, k=7, stride=2, pad=3, size=128, batch=8),
}


class _PlainRatio:
    @staticmethod
    def apply(r_out, z, eps):
        z = z + eps * torch.where(z >= 0, torch.ones_like(z), -torch.ones_like(z))
        return r_out / z.unsqueeze(1), z


def _zb_with_bn_output(layer, bn, conv_out, x, r_out, low, high):
    """What lrp.py would do with an in-place ReLU after the BatchNorm (z_full not kept)."""
    folded, z_full = fold_batchnorm_for_zb(layer, bn, conv_out)
    return rules.zb_relevance(folded, x, r_out, low, high, 0.0, 1.0, 1e-2, z_full=z_full)


def make(setting: str, M: int = 1, dtype=torch.float32):
    p = SETTINGS[setting]
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(p["cout"], p["cin"], p["k"], p["k"], generator=g, dtype=dtype) * 0.2).requires_grad_()
    gamma = (torch.rand(p["cout"], generator=g, dtype=dtype) + 0.5).requires_grad_()
    beta = (torch.randn(p["cout"], generator=g, dtype=dtype) * 0.1).requires_grad_()
    x = torch.rand(p["batch"], p["cin"], p["size"], p["size"], generator=g, dtype=dtype)
    so = (p["size"] + 2 * p["pad"] - p["k"]) // p["stride"] + 1
    G = torch.rand(p["batch"], M, p["cout"], so, so, generator=g, dtype=dtype).requires_grad_()
    mask = (torch.rand(1, 1, 1, p["size"], p["size"], generator=g, dtype=dtype) > 0.5).to(dtype)
    low = torch.zeros(1, p["cin"], 1, 1, dtype=dtype).expand(1, p["cin"], p["size"], p["size"])
    high = torch.ones(1, p["cin"], 1, 1, dtype=dtype).expand(1, p["cin"], p["size"], p["size"])
    st, pd = (p["stride"],) * 2, (p["pad"],) * 2
    rm, rv = torch.zeros(p["cout"], dtype=dtype), torch.ones(p["cout"], dtype=dtype)

    def step(config: str):
        conv_out = F.conv2d(x, w, None, st, pd)
        bn = dict(input=conv_out, running_mean=rm, running_var=rv, weight=gamma, bias=beta, training=True,
                  momentum=0.0, eps=1e-5)
        y = F.batch_norm(conv_out, rm, rv, gamma, beta, True, 0.0, 1e-5)
        act = y.relu()
        r_out = act.unsqueeze(1) * G
        loss = act.mean()
        if config != "base":
            layer = LinearLayer("conv2d", w, None, st, pd, (1, 1), 1)
            if config == "ref":
                R = rules._zb_relevance_reference(fold_batchnorm_as_used(layer, bn, conv_out), x, r_out, low, high,
                                                  0.0, 1.0, 1e-2)
            elif config == "new_y":
                R = rules.zb_relevance(fold_batchnorm_as_used(layer, bn, conv_out), x, r_out, low, high, 0.0, 1.0,
                                       1e-2, z_full=y)
            elif config == "new_noz":
                R = rules.zb_relevance(fold_batchnorm_as_used(layer, bn, conv_out), x, r_out, low, high, 0.0, 1.0,
                                       1e-2)
            else:
                saved = rules.ZbRatio
                if config == "new_div":
                    rules.ZbRatio = _PlainRatio
                try:
                    R = _zb_with_bn_output(layer, bn, conv_out, x, r_out, low, high)
                finally:
                    rules.ZbRatio = saved
            loss = loss + (R * mask).abs().mean()
        loss.backward()
        w.grad = gamma.grad = beta.grad = G.grad = None

    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", default="a,b")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--configs", default="base,ref,new,new_y,new_noz,new_div")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-memory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    configs = args.configs.split(",")
    for setting in args.setting.split(","):
        step = make(setting)
        for c in configs:  # warm-up
            step(c); step(c)
        times = {c: [] for c in configs}
        for _ in range(args.repeats):
            for c in configs:
                t = time.process_time()
                step(c)
                times[c].append(time.process_time() - t)
        med = {c: statistics.median(v) * 1e3 for c, v in times.items()}
        peak = {} if args.no_memory else {c: peak_step_bytes(lambda: step(c), "cpu") / 2**20 for c in configs}
        print(f"setting ({setting}) {SETTINGS[setting]}, {args.repeats} repeats, {args.threads} thread(s)")
        print(f"{'config':<9} {'median ms':>10} {'zb ms':>8} {'min ms':>8} {'peak MB':>8} {'zb MB':>7}")
        for c in configs:
            zb = med[c] - med.get("base", 0.0)
            pk = peak.get(c, float("nan"))
            print(f"{c:<9} {med[c]:10.2f} {zb:8.2f} {min(times[c]) * 1e3:8.2f} {pk:8.2f} "
                  f"{pk - peak.get('base', 0.0):7.2f}")


if __name__ == "__main__":
    main()
