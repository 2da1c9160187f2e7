"""The information plane of pre-training runs, measured by estimators that the runs did not train.

    python tools/info_plane.py --runs runs/mi_mae runs/mae4 --data_path /usr/share/datasets/fashion-mnist \
        --dataset fashion_mnist --input_size 32 --output_dir info_plane/

For every `checkpoint-<epoch>.pth` of every run, on held-out images (the val/test split) with the same four
orthogonal masks at ratio 0.75 for every model (MAE included, so that every run is measured alike):

- I(x; z) between a visible patch x (its norm-pix values) and its latent token z, in nats per latent feature,
  by two independent estimators fitted afresh on `--fit_images` and evaluated on `--eval_images` others:
  - `club_fresh_v` (i_xz): CLUB (Cheng et al., 2020) with a new Gaussian MLP q(z|x), trained until its held-out
    NLL stops improving, on latents standardised with the fit images' statistics (scale-free); negatives are
    every held-out token (CLUB's marginal), never the run's own V;
  - `linear_gaussian` (i_xz_gaussian): the joint-Gaussian estimate (logdet Cov z - logdet Cov(z | x)) / 2D, with
    Cov(z | x) the held-out residual covariance of a least-squares regression of z on x (closed form, no training);
- for comparison with a run's own V, the same fresh V's CLUB with the negatives taken within each image
  (`club_within_image`, the patch-level training bound's reading: a run's train_min_mi) and its gain over a
  Gaussian that ignores x (`fresh_v_gain`: a run's train_v_gain);
- I(z_j; z_k) between two masks' pooled latents of one image, in nats (whole vector): `infonce_heldout` (i_zz),
  the InfoNCE lower bound log K - CE over the K held-out images with cosine similarity of the standardised latents,
  its temperature picked on the fit images, averaged over the 12 ordered mask pairs; it cannot exceed log K.

Writes OUT/info_plane.json (per run and epoch: epoch, i_xz, i_xz_gaussian, i_zz, the estimators' names and the
run's last train_rec) and OUT/info_plane.png (each run a trajectory over epochs: I(x; z) across, I(z; z) up).
"""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from models_mi_mae import GaussianVariationalNet  # noqa: E402
from util.checkpoint import load_checkpoint, load_matching_state  # noqa: E402
from util.datasets import DATASETS, build_dataset, build_transform, subset  # noqa: E402
from util.mi_losses import club_upper_bound, gaussian_log_likelihood, marginal_gaussian_nll  # noqa: E402
from util.mim import gather_tokens, normalize_patches, orthogonal_mask_noise, patchify, random_masking  # noqa: E402
from util.registry import add_method_args, create_model, method_for  # noqa: E402

ESTIMATORS = {"i_xz": "club_fresh_v", "i_xz_gaussian": "linear_gaussian", "i_zz": "infonce_heldout",
              "club_within_image": "club_fresh_v_within_image", "fresh_v_gain": "club_fresh_v_gain"}
NUM_MASKS, MASK_RATIO = 4, 0.75
TEMPERATURES = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


# --- estimators: pure functions on (n, d) samples, tested on data of known MI --------------------------------


def fit_gaussian_v(x: torch.Tensor, z: torch.Tensor, max_steps: int = 3000, batch: int = 2048, patience: int = 200,
                   seed: int = 0) -> GaussianVariationalNet:
    """Fit a new Gaussian MLP q(z|x) (MI-MAE's V, log sigma^2 in (-8, 8)) by maximum likelihood until the NLL on a held-back 10% of the pairs has not improved for
    `patience` steps (or `max_steps`); returns the best V seen on that slice."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=generator)
    held = order[: max(1, x.shape[0] // 10)]
    train = order[held.shape[0]:]
    net = GaussianVariationalNet(x.shape[1], z.shape[1], hidden=256, logvar_bound=8.0)  # a new V, wider log sigma^2 range
    optimizer = torch.optim.Adam(net.parameters(), lr=2e-3)
    best, best_state, since = math.inf, None, 0
    for step in range(max_steps):
        rows = train[torch.randint(train.shape[0], (min(batch, train.shape[0]),), generator=generator)]
        mu, logvar = net(x[rows])
        loss = -gaussian_log_likelihood(z[rows], mu, logvar).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 25 == 0:
            with torch.no_grad():
                held_nll = -gaussian_log_likelihood(z[held], *net(x[held])).mean().item()
            if held_nll < best - 1e-4:
                best, best_state, since = held_nll, {k: v.clone() for k, v in net.state_dict().items()}, 0
            else:
                since += 25
                if since >= patience:
                    break
    net.load_state_dict(best_state)
    return net


def club_fresh_v(x_fit, z_fit, x_eval, z_eval, group: int = 0, **fit_kwargs) -> dict[str, float]:
    """CLUB estimates of I(x; z) in nats per feature of z, V fitted on the fit pairs and evaluated on the eval pairs,
    z standardised with the fit pairs' statistics (scale-free):
    - `club`: every eval latent is a negative (CLUB's marginal);
    - `club_within`: with `group` > 0, the negatives of a pair are the `group` consecutive pairs of its image
      (the patch-level training bound's reading, comparable with a run's train_min_mi);
    - `v_gain`: NLL of a per-feature Gaussian fitted to the eval latents minus V's NLL (a run's train_v_gain)."""
    mean, std = z_fit.mean(0), z_fit.std(0).clamp(min=1e-6)
    net = fit_gaussian_v(x_fit, (z_fit - mean) / std, **fit_kwargs)
    z_eval = (z_eval - mean) / std
    with torch.no_grad():
        mu, logvar = net(x_eval)
        result = {"club": club_upper_bound(z_eval[None], mu[None], logvar[None]).item(),
                  "v_gain": (marginal_gaussian_nll(z_eval) + gaussian_log_likelihood(z_eval, mu, logvar).mean()).item()}
        if group:
            result["club_within"] = club_upper_bound(*(t.reshape(-1, group, t.shape[-1]) for t in (z_eval, mu, logvar))).item()
    return result


def linear_gaussian_mi(x_fit, z_fit, x_eval, z_eval, ridge: float = 1e-3) -> float:
    """Joint-Gaussian estimate of I(x; z) in nats per feature of z: (logdet Cov(z) - logdet Cov(z - Wx)) / (2D),
    W the least-squares regression of z on [x, 1] fitted on the fit pairs, both covariances on the eval pairs."""
    x_fit, z_fit, x_eval, z_eval = (t.double() for t in (x_fit, z_fit, x_eval, z_eval))
    design = torch.cat([x_fit, torch.ones(x_fit.shape[0], 1, dtype=x_fit.dtype)], 1)
    gram = design.T @ design + ridge * x_fit.shape[0] * torch.eye(design.shape[1], dtype=x_fit.dtype)
    weights = torch.linalg.solve(gram, design.T @ z_fit)
    residual = z_eval - torch.cat([x_eval, torch.ones(x_eval.shape[0], 1, dtype=x_eval.dtype)], 1) @ weights
    eye = 1e-8 * torch.eye(z_eval.shape[1], dtype=z_eval.dtype)
    logdet_z = torch.linalg.slogdet(torch.cov(z_eval.T) + eye)[1]
    logdet_res = torch.linalg.slogdet(residual.T @ residual / residual.shape[0] + eye)[1]
    return ((logdet_z - logdet_res) / (2 * z_eval.shape[1])).item()


def info_nce_bound(a: torch.Tensor, b: torch.Tensor, temperature: float) -> float:
    """log K - CE of matching row i of a to row i of b among the K rows of b (cosine similarity / temperature)."""
    logits = F.normalize(a.float(), dim=1) @ F.normalize(b.float(), dim=1).T / temperature
    return math.log(a.shape[0]) - F.cross_entropy(logits, torch.arange(a.shape[0])).item()


def heldout_info_nce(views_fit: torch.Tensor, views_eval: torch.Tensor) -> float:
    """InfoNCE lower bound on I(z_j; z_k) in nats for views (n, N, d): the temperature is the one of
    TEMPERATURES that scores best on the fit images, the bound is the eval images' mean over ordered pairs j != k.
    Latents are standardised with the fit images' statistics."""
    mean, std = views_fit.mean((0, 1)), views_fit.std((0, 1)).clamp(min=1e-6)
    views_fit, views_eval = (views_fit - mean) / std, (views_eval - mean) / std
    pairs = [(j, k) for j in range(views_fit.shape[1]) for k in range(views_fit.shape[1]) if j != k]

    def mean_bound(views, tau):
        return sum(info_nce_bound(views[:, j], views[:, k], tau) for j, k in pairs) / len(pairs)

    chunk = views_fit[: views_eval.shape[0]]  # the same K as the eval images, so both bounds have one cap
    tau = max(TEMPERATURES, key=lambda t: mean_bound(chunk, t))
    return mean_bound(views_eval, tau)


# --- the checkpoints' latents --------------------------------------------------------------------------------


def build_model(checkpoint: dict, source: Path) -> torch.nn.Module:
    saved = checkpoint.get("args") or {}
    if "model" not in saved:
        raise SystemExit(f"error: {source} has no saved args naming its model; only this codebase's pre-training checkpoints can be measured")
    # flags added after the run was saved take their defaults
    parser = argparse.ArgumentParser()
    add_method_args(parser)
    flags = argparse.Namespace(**{**vars(parser.parse_args([])), **saved})
    model = create_model(saved["model"], **method_for(saved["model"]).model_kwargs(flags))
    load_matching_state(model, checkpoint["model"], source)
    return model.eval()


@torch.no_grad()
def latents(model, images: torch.Tensor, noise: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, ...]:
    """Patch values x (n, N*n_v, P), tokens z (n, N*n_v, D) and pooled latents (n, N, D) under the fixed masks."""
    xs, zs, pooled = [], [], []
    for start in range(0, images.shape[0], batch):
        imgs = images[start:start + batch]
        masking = random_masking(orthogonal_mask_noise(noise[start:start + batch], NUM_MASKS, MASK_RATIO)
                                 .reshape(-1, model.num_patches), MASK_RATIO)
        tokens = model.embed_patches(imgs).repeat_interleave(NUM_MASKS, dim=0)
        z = model.encode(tokens, masking.ids_keep)[:, 1:].float()
        x = gather_tokens(normalize_patches(patchify(imgs, model.patch_size)).repeat_interleave(NUM_MASKS, dim=0),
                          masking.ids_keep)
        xs.append(x.reshape(imgs.shape[0], -1, x.shape[-1]))
        zs.append(z.reshape(imgs.shape[0], -1, z.shape[-1]))
        pooled.append(z.mean(1).reshape(imgs.shape[0], NUM_MASKS, -1))
    return torch.cat(xs), torch.cat(zs), torch.cat(pooled)


def measure(model, images: torch.Tensor, noise: torch.Tensor, fit_images: int, seed: int) -> dict:
    x, z, pooled = latents(model, images, noise)
    fit, held = slice(0, fit_images), slice(fit_images, None)
    flat = [t.reshape(-1, t.shape[-1]) for t in (x[fit], z[fit], x[held], z[held])]
    club = club_fresh_v(*flat, group=x.shape[1], seed=seed)
    return {"i_xz": club["club"], "i_xz_gaussian": linear_gaussian_mi(*flat),
            "i_zz": heldout_info_nce(pooled[fit], pooled[held]),
            "club_within_image": club["club_within"], "fresh_v_gain": club["v_gain"]}


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in run.glob("checkpoint-*.pth") if (m := re.fullmatch(r"checkpoint-(\d+)\.pth", p.name))]
    return sorted(found)


def last_train_rec(run: Path, epoch: int):
    log = run / "log.txt"
    if not log.is_file():
        return None
    for line in log.read_text().splitlines():
        record = json.loads(line)
        if record.get("epoch") == epoch:
            return record.get("train_rec")
    return None


def plot(results: dict, path: Path, colors: dict[str, str] | None = None) -> None:
    """One line of points per label (annotated with the epoch); `colors` may fix a label's colour (seeds of one
    method alike), otherwise matplotlib's cycle picks it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5))
    for label, records in results.items():
        xs, ys = [r["i_xz"] for r in records], [r["i_zz"] for r in records]
        line, = ax.plot(xs, ys, marker="o", label=label, color=(colors or {}).get(label))
        for r in records:
            ax.annotate(str(r["epoch"]), (r["i_xz"], r["i_zz"]), fontsize=7, color=line.get_color(),
                        textcoords="offset points", xytext=(3, 3))
    ax.set_xscale("symlog", linthresh=0.1)  # a run whose latents copy their patch sits orders of magnitude out
    ax.set_xlabel("I(x; z): patch vs its token, CLUB with a fresh V (nats / feature, log scale)")
    ax.set_ylabel("I(z_j; z_k): two masks' pooled latents, held-out InfoNCE (nats)")
    ax.set_title("Information plane (numbers: epochs)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", required=True, help="pre-training output folders holding checkpoint-<epoch>.pth files")
    parser.add_argument("--labels", nargs="+", default=None, help="one name per run for the plot and JSON (default: the folder paths)")
    parser.add_argument("--data_path", required=True, help="dataset folder; its val/test split supplies the held-out images")
    parser.add_argument("--dataset", default="imagefolder", choices=DATASETS)
    parser.add_argument("--input_size", default=224, type=int)
    parser.add_argument("--fit_images", default=768, type=int, help="held-out images the fresh estimators are fitted on")
    parser.add_argument("--eval_images", default=256, type=int, help="further held-out images the estimates are computed on (K of InfoNCE)")
    parser.add_argument("--seed", default=0, type=int, help="images, masks and the estimators' initialisation")
    parser.add_argument("--output_dir", required=True)
    return parser


def main(argv=None) -> dict:
    args = get_args_parser().parse_args(argv)
    labels = args.labels or args.runs
    if len(labels) != len(args.runs):
        raise SystemExit(f"error: --labels gives {len(labels)} names for {len(args.runs)} --runs")
    runs = [Path(r) for r in args.runs]
    for run in runs:
        if not checkpoints(run):
            raise SystemExit(f"error: --runs: no checkpoint-<epoch>.pth in {run}")
    count = args.fit_images + args.eval_images
    dataset = subset(build_dataset(args.dataset, args.data_path, "val", build_transform(False, args.input_size, "finetune")),
                     count, args.seed)
    if len(dataset) < count:
        raise SystemExit(f"error: the val split has {len(dataset)} images, fewer than --fit_images + --eval_images = {count}")
    images = torch.stack([dataset[i][0] for i in range(count)])
    torch.set_grad_enabled(True)
    results, noise = {}, None
    for label, run in zip(labels, runs):
        results[label] = []
        for epoch, path in checkpoints(run):
            model = build_model(load_checkpoint(path), path)
            if noise is None or noise.shape[1] != model.num_patches:
                noise = torch.rand(count, model.num_patches, generator=torch.Generator().manual_seed(args.seed))
            record = {"epoch": epoch, **measure(model, images, noise, args.fit_images, args.seed),
                      "train_rec": last_train_rec(run, epoch), "estimators": ESTIMATORS}
            print(json.dumps({"run": label, **record}), flush=True)
            results[label].append(record)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "info_plane.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "info_plane.png")
    print(f"wrote {out / 'info_plane.json'} and {out / 'info_plane.png'}")
    return results


if __name__ == "__main__":
    main()
