"""The encoder's own tasks in CMAE (Mao et al.) as pure tensor functions (computed in float32).

- `nt_xent_loss`: SimCLR's NT-Xent between the two views of each image.
- `position_cross_entropy`: classification of the original patch index of tokens whose position was withheld.
"""
import torch
import torch.nn.functional as F


def nt_xent_loss(u1: torch.Tensor, u2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """NT-Xent over the 2N rows u = [u1; u2], u1 and u2 (N, d) L2-normalised, row i of u1 and u2 one image:

        L = 1/(2N) sum_i -log( exp(u_i . u_i+ / tau) / sum_{k != i} exp(u_i . u_k / tau) ),

    i+ being the other view of row i's image. Returns the loss and the top-1 accuracy (%) of finding i+
    among the 2N - 1 other rows.
    """
    if u1.shape != u2.shape:
        raise ValueError(f"the two views' embeddings differ in shape: {tuple(u1.shape)} and {tuple(u2.shape)}")
    rows = u1.shape[0]
    u = torch.cat([u1, u2]).float()
    with torch.autocast(u.device.type, enabled=False):  # else the matmul runs in half precision under autocast
        logits = u @ u.T / temperature  # (2N, 2N)
    logits = logits.masked_fill(torch.eye(2 * rows, dtype=torch.bool, device=u.device), float("-inf"))
    positive = torch.arange(2 * rows, device=u.device).roll(rows)  # i+ of row i, made on the device
    loss = F.cross_entropy(logits, positive)
    accuracy = (logits.argmax(dim=1) == positive).float().mean() * 100
    return loss, accuracy.detach()


def position_cross_entropy(logits: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L_pos = -1/|Q| sum_q log softmax(logits_q)[p(q)] over every predicted token q.

    logits (..., L) over the L patch indices; positions (...) the true indices p(q). Returns the loss and the
    top-1 accuracy (%).
    """
    flat = logits.reshape(-1, logits.shape[-1]).float()
    target = positions.reshape(-1)
    loss = F.cross_entropy(flat, target)
    accuracy = (flat.argmax(dim=1) == target).float().mean() * 100
    return loss, accuracy.detach()
