"""CPU time (process_time: steadier than wall time on a loaded machine) of one Selective ISNet
training step, median of N: setting (a) small_cnn 3x32x32 batch 32, (b) resnet18 3x128x128 batch 8;
1 thread.  Usage: python bench/step_cputime.py a|b N.  To compare two versions of the method layer,
run it with PYTHONPATH pointing at each checkout's python/ folder, alternately."""
import sys, time, torch, fisnet
from fisnet.models import small_cnn, resnet18
torch.set_num_threads(1)
torch.manual_seed(0)
which = sys.argv[1]
if which == "a":
    m = small_cnn(num_classes=10, width=16) if "width" in small_cnn.__code__.co_varnames else small_cnn(num_classes=10)
    x = torch.rand(32, 3, 32, 32); y = torch.randint(0, 10, (32,))
else:
    m = resnet18(num_classes=10); x = torch.rand(8, 3, 128, 128); y = torch.randint(0, 10, (8,))
m.train()
mask = torch.zeros(x.shape[0], 1, *x.shape[2:]); mask[..., 8:-8, 8:-8] = 1
net = fisnet.ISNet(m, "selective")
crit = fisnet.ISNetLoss(P=0.7, cuts=(1.0, 10.0))
def step():
    out = net(x, y); loss = crit(out, y, mask); loss.backward()
for _ in range(2): step()
ts = []
for _ in range(int(sys.argv[2])):
    t = time.process_time(); step(); ts.append(time.process_time() - t)
ts.sort(); print(which, "median", ts[len(ts)//2]*1e3, "ms")
