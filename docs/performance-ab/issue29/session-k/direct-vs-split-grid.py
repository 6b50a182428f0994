import sys, time, statistics, torch
torch.set_num_threads(1)
sys.path.insert(0,'src')
import cbn.kernels; cbn.kernels.active()
from cbn.functional.statistic_gradients import producer_statistic_gradients_of_layers
shapes = []
for n in (1, 2):
    for c in (16, 32, 64):
        for hw in (7, 14, 20, 28, 40, 56):
            shapes.append((n, c, c, hw, 1))
        for hw in (14, 28, 40, 56):
            shapes.append((n, c, 2 * c, hw, 2))
for (n, cin, cout, hw, s) in shapes:
    conv = torch.nn.Conv2d(cin, cout, 3, s, 1, bias=False)
    x = torch.randn(n, cin, hw, hw)
    with torch.no_grad(): y = conv(x)
    mu = y.mean((0,2,3)); w = torch.empty_like(conv.weight)
    m = y.numel() // cout
    def split():
        g = (y - mu.view(1,-1,1,1)).mul_(2/m)
        torch.ops.aten.convolution_backward(g, x, w, None, conv.stride, conv.padding, conv.dilation, False, [0,0], 1, [False, True, False])
        torch.ops.cbn.mean_patches(x, [3,3], list(conv.stride), list(conv.padding), [1,1], list(y.shape[2:]), m)
    fns = {"direct": lambda: producer_statistic_gradients_of_layers([(conv, x, y, mu)]), "split": split}
    ts = {k_: [] for k_ in fns}
    reps = max(5, int(0.3 / max(1e-4, 2 * n * cin * cout * 9 * (hw // s) ** 2 / 4e10)))
    for r in range(min(reps, 60)):
        for k_, f in fns.items():
            t = time.perf_counter(); f(); ts[k_].append(time.perf_counter() - t)
    d, sp = statistics.median(ts["direct"]), statistics.median(ts["split"])
    print(f"{n}:{cin}:{cout}:{hw}:s{s} direct {d*1e3:.3f} split {sp*1e3:.3f} ratio {d/sp:.2f}", flush=True)
