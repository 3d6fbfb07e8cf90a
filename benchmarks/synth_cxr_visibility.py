"""How visible is each synthetic-radiograph finding at a given image size?

    python benchmarks/synth_cxr_visibility.py [N=600]

For the first 60 studies: the image rendered with one finding on minus the same image with it off, downsampled
(area) to 128 / 64 / 32 px: the largest difference (grey levels) and the pixels changed by more than 8 levels.
For N studies: a logistic probe (C = 0.01) on the raw z-scored pixels at 64 and 32 px, 80/20 split, AUC per
finding (uncertain labels left out). A finding a linear probe on pixels separates is visible at that size; one
it does not may still be (a small blob anywhere in a lung is not a linear function of the pixels).
"""
import sys, time
import numpy as np
from medvlp.data_shards.synth.cxr import draw_cxr_spec, render_cxr, FINDINGS_CXR
from medvlp.data_shards.synth.util import iter_studies
from medvlp.data_shards.synth.cxr import CXR_VISITS
import torch, torch.nn.functional as F
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

n = int(sys.argv[1]) if len(sys.argv) > 1 else 600
t0 = time.time()
imgs, labs, diffs = [], [], {f: [] for f in FINDINGS_CXR}
for st in iter_studies(0, "cxr", n, CXR_VISITS):
    spec = draw_cxr_spec(0, st, 128)
    img, _ = render_cxr(spec)
    imgs.append(img.astype(np.float32) / 255)
    labs.append([spec["labels"][f] for f in FINDINGS_CXR])
    if st.index < 60:
        base = {f: 0.0 for f in FINDINGS_CXR}
        for f in FINDINGS_CXR:
            on, _ = render_cxr(spec, {**base, f: 1.0})
            off, _ = render_cxr(spec, base)
            d = torch.tensor((on.astype(np.float32) - off.astype(np.float32)))[None, None]
            for s in (128, 64, 32):
                ds = F.interpolate(d, size=(s, s), mode="area")[0, 0].numpy()
                diffs[f].append((s, np.abs(ds).max(), (np.abs(ds) > 8).sum()))
print(f"rendered {n} in {time.time()-t0:.0f}s", flush=True)
X = torch.tensor(np.stack(imgs))[:, None]
Y = np.array(labs)
for f in FINDINGS_CXR:
    for s in (128, 64, 32):
        v = [d for d in diffs[f] if d[0] == s]
        print(f"{f:14s} size {s:3d}: max |diff| {np.mean([x[1] for x in v]):6.1f} grey levels, pixels >8: {np.mean([x[2] for x in v]):7.1f}")
tr = np.arange(n) < int(0.8 * n)
for s in (64, 32):
    Xs = F.interpolate(X, size=(s, s), mode="area").reshape(n, -1).numpy()
    Xs = (Xs - Xs[tr].mean(0)) / (Xs[tr].std(0) + 1e-6)
    out = []
    for k, f in enumerate(FINDINGS_CXR):
        keep = Y[:, k] != -1
        y = Y[:, k] == 1
        clf = LogisticRegression(C=0.01, max_iter=300).fit(Xs[tr & keep], y[tr & keep])
        out.append(f"{f}={roc_auc_score(y[~tr & keep], clf.decision_function(Xs[~tr & keep])):.3f}")
    print(f"pixel probe {s}px: " + " ".join(out), flush=True)
