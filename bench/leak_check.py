"""Resident memory of the process over training steps of one ISNet variant (small_cnn, batch 32):
a leak shows as steady growth.  Usage: python bench/leak_check.py dual|selective|..."""
import torch, fisnet, sys, gc
from fisnet.models import small_cnn
torch.manual_seed(0); torch.set_num_threads(1)
m = small_cnn(num_classes=10); net = fisnet.ISNet(m, sys.argv[1]); crit = fisnet.ISNetLoss(P=0.7, cuts=(1.0, 10.0))
x = torch.rand(32, 3, 32, 32); y = torch.randint(0, 10, (32,)); mask = torch.ones(32, 1, 32, 32)
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
for i in range(21):
    out = net(x, y); loss = crit(out, y, mask); loss.backward()
    if i % 10 == 0: print(sys.argv[1], i, f"{rss():.0f} MB")
