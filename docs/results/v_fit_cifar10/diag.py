"""A frozen record of the issue-32 screen (2026-12-07), kept to reproduce docs/RESULTS.md's trace, not maintained: it
replaces MI-MAE's forward of commit 138fd89 with a copy that also probes each term's gradient. Diagnostic wrapper
around main_pretrain.py (not part of the package): per optimizer step, V's held-out gain in
float32 (before its extra steps, on the batch it has not seen), its in-sample gain after the steps, V's mean
log-variance; every 50 steps the encoder-gradient norms of each weighted loss term. Writes DIAG (jsonl)."""
import json, os, sys
sys.path.insert(0, "/work/main")
os.chdir("/work/main")
import torch
import engine_pretrain
import models_mi_mae
from util.mi_losses import gaussian_log_likelihood, marginal_gaussian_nll

OUT = open(os.environ["DIAG"], "w")
state = {"step": 0}
orig_steps = engine_pretrain.estimator_steps

def gain(model, pairs):
    with torch.no_grad():
        mu, logvar = model.variational(pairs[0].float())
        nll = -gaussian_log_likelihood(pairs[1], mu, logvar).mean()
        return (marginal_gaussian_nll(pairs[1]) - nll).item(), logvar.float().mean().item()

def estimator_steps(task, optimizer):
    inner = task.module if hasattr(task, "module") else task
    model = inner.model
    pairs = model._v_pairs
    rec = {"step": state["step"]}
    if pairs is not None:
        rec["pre"], rec["logvar"] = gain(model, pairs)
    orig_steps(task, optimizer)
    if pairs is not None:
        rec["post"], _ = gain(model, pairs)
    rec.update(state.pop("grads", {}))
    rec.update(state.pop("terms", {}))
    OUT.write(json.dumps(rec) + "\n"); OUT.flush()
    state["step"] += 1

engine_pretrain.estimator_steps = estimator_steps

from engine_pretrain import PretrainOutput
from util.mim import masked_mse_loss, normalize_patches, patchify, random_masking

def forward(self, imgs, noise=None):
    batch, num_masks = imgs.shape[0], self.num_masks
    masking = random_masking(self.mask_noise(self.draw_noise(imgs) if noise is None else noise), self.mask_ratio)
    tokens = self.embed_patches(imgs).repeat_interleave(num_masks, dim=0)
    latent = self.encode(tokens, masking.ids_keep)
    pred = self.decode(latent, masking.ids_restore)
    pixels = patchify(imgs, self.patch_size)
    target = normalize_patches(pixels) if self.norm_pix_loss else pixels
    losses = {"rec": masked_mse_loss(pred, target.repeat_interleave(num_masks, dim=0), masking.mask)}
    terms = {}
    if self.mi_projector is not None:
        losses["max_mi"], terms["nce_acc"] = self.max_mi_loss(latent, batch)
    if self.variational is not None:
        x, z = self.club_pairs(tokens, pixels, latent, masking, batch)
        min_mi = self.min_mi_terms(x, z)
        losses["v_nll"], terms["v_gain"] = min_mi["v_nll"], min_mi["v_gain"]
        (losses if self.weights["min_mi"] > 0 else terms)["min_mi"] = min_mi["min_mi"]
        if "club_gate" in min_mi:
            terms["club_gate"] = min_mi["club_gate"]
    if self.training and state["step"] % 50 == 0:
        grads = {}
        for name in ("rec", "max_mi", "min_mi"):
            if name in losses and losses[name].requires_grad:
                g, = torch.autograd.grad(self.weights[name] * losses[name], latent, retain_graph=True, allow_unused=True)
                grads["g_" + name] = 0.0 if g is None else g.float().norm().item()
        state["grads"] = grads
    gates = {"min_mi": terms.get("club_gate", 1.0)}
    loss = sum(self.weights[name] * gates.get(name, 1.0) * value for name, value in losses.items())
    terms = {**{name: value.detach() for name, value in losses.items()}, **terms}
    terms["latent_std"] = latent[:, 1:].detach().float().reshape(batch, -1, latent.shape[-1]).std(dim=1).mean()
    if self.training:
        state["terms"] = {k: round(v.item(), 5) for k, v in terms.items()}
    features = latent[:, 0].reshape(batch, num_masks, -1).mean(dim=1)
    return PretrainOutput(loss, terms, features)

models_mi_mae.MIMaskedAutoencoderViT.forward = forward

import collections
REPLAY = int(os.environ.get("REPLAY", "0"))
if REPLAY:
    # screen: V's extra steps cycle over the pairs of the last REPLAY optimizer steps, newest first
    orig_mmt = models_mi_mae.MIMaskedAutoencoderViT.min_mi_terms
    def min_mi_terms(self, x, z):
        out = orig_mmt(self, x, z)
        if self._v_pairs is not None:
            if not hasattr(self, "_replay"):
                self._replay = collections.deque(maxlen=REPLAY)
            self._replay.append(self._v_pairs)
            self._v_pairs = None
            self._replay_new = True
        return out
    def estimator_losses(self):
        if not getattr(self, "_replay_new", False):
            return
        self._replay_new = False
        buf = list(self._replay)[::-1]
        for i in range(self.v_steps):
            src, tgt = buf[i % len(buf)]
            mu, logvar = self.variational(src)
            yield -gaussian_log_likelihood(tgt, mu, logvar).mean()
    models_mi_mae.MIMaskedAutoencoderViT.min_mi_terms = min_mi_terms
    models_mi_mae.MIMaskedAutoencoderViT.estimator_losses = estimator_losses
    _orig_est = estimator_steps
    def estimator_steps2(task, optimizer):
        inner = task.module if hasattr(task, "module") else task
        m = inner.model
        if getattr(m, "_replay_new", False):
            m._v_pairs = m._replay[-1]  # for the diag's pre/post gains only
        _orig_est(task, optimizer)
    # the diag's estimator_steps reads model._v_pairs; estimator_losses ignores it
    engine_pretrain.estimator_steps = estimator_steps2

if os.environ.get("CLAMP"):
    # screen: CLUB per image clamped at 0 (a negative estimate is V's error, not information)
    def clamped_club(z, mu, logvar):
        z, mu, logvar = z.float(), mu.float(), logvar.float()
        inv_two_var = 0.5 * torch.exp(-logvar)
        positive = (z - mu).pow(2)
        negative = z.var(dim=1, unbiased=False, keepdim=True) + (z.mean(dim=1, keepdim=True) - mu).pow(2)
        return ((negative - positive) * inv_two_var).mean(-1).mean(-1).clamp(min=0).mean()
    models_mi_mae.club_upper_bound = clamped_club

GATESIG = os.environ.get("GATESIG")
if GATESIG:
    # screen: the gate's signal is V's held-out CLUB estimate (club) or the smaller of it and v_gain (min)
    from util.mi_losses import fit_gate
    orig_mmt2 = models_mi_mae.MIMaskedAutoencoderViT.min_mi_terms
    def min_mi_terms_g(self, x, z):
        out = orig_mmt2(self, x, z)
        if "club_gate" in out:
            est = out["min_mi"].detach()
            sig = est if GATESIG == "club" else torch.minimum(est, out["v_gain"].detach())
            out["club_gate"] = fit_gate(sig, self.club_gate)
        return out
    models_mi_mae.MIMaskedAutoencoderViT.min_mi_terms = min_mi_terms_g

import main_pretrain
parser = main_pretrain.get_args_parser()
args = main_pretrain.parse_with_config(parser)
main_pretrain.validate_args(args, parser)
main_pretrain.main(args)
