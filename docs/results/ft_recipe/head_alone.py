# The head-alone check of docs/RESULTS.md (FT1% recipe search): pooled features of a frozen encoder, behind a
# LayerNorm or a per-feature standardisation, and a linear head trained for 94 AdamW steps on 600 images.
# Run from the repository root: PYTHONPATH=. python docs/results/ft_recipe/head_alone.py random CKPT [CKPT ...]
import torch, sys, argparse
import models_vit
from models_vit import load_pretrained_encoder
from util.checkpoint import load_checkpoint, model_state_from
from util.datasets import build_dataset, build_transform
torch.manual_seed(0)
args = argparse.Namespace(input_size=32)
tr = build_dataset("fashion_mnist", "/usr/share/datasets/fashion-mnist", "train", build_transform(False, 32, "finetune", args))
te = build_dataset("fashion_mnist", "/usr/share/datasets/fashion-mnist", "val", build_transform(False, 32, "finetune", args))
g = torch.Generator().manual_seed(0)
idx = torch.randperm(len(tr), generator=g)[:600]
def feats(m, ds, ids):
    xs = torch.stack([ds[int(i)][0] for i in ids]); ys = torch.tensor([ds[int(i)][1] for i in ids])
    with torch.no_grad():
        return m.forward_features(xs)[:, 1:].mean(1), ys
for ck in sys.argv[1:]:
    m = models_vit.vit_tiny_patch4(num_classes=10, global_pool=True, img_size=32)
    if ck != "random": load_pretrained_encoder(m, model_state_from(load_checkpoint(ck)))
    m.eval()
    ftr, ytr = feats(m, tr, idx); fte, yte = feats(m, te, range(2000))
    mu, sd = ftr.mean(0), ftr.std(0)
    for name, norm in [("LN", lambda f: torch.nn.functional.layer_norm(f, (192,), eps=1e-6)), ("BN", lambda f: (f - mu) / (sd + 1e-6))]:
        for lr in [2e-3, 1e-2]:
            head = torch.nn.Linear(192, 10); torch.nn.init.trunc_normal_(head.weight, std=2e-5); torch.nn.init.zeros_(head.bias)
            opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.05)
            a, b = norm(ftr), norm(fte)
            for step in range(94):
                j = torch.randint(0, 600, (64,))
                loss = torch.nn.functional.cross_entropy(head(a[j]), ytr[j]); opt.zero_grad(); loss.backward(); opt.step()
            acc = (head(b).argmax(1) == yte).float().mean() * 100
            print(f"{ck.split('/')[-2] if ck != 'random' else ck:12s} {name} lr {lr:g}: head-only 94 Adam steps -> test {acc:.1f}%  (train loss {loss.item():.2f})")
