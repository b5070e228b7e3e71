"""The slow GPTQ reference the solver tests share: column by column from the explicit inverse."""

import torch


def slow_obq(W, H, percdamp, act_order, round_column):
    """Column-by-column GPTQ from the explicit inverse (OBQ form), float64, no Cholesky, no blocks.

    After column j is quantized the remaining columns absorb (w_j - q_j) / Hinv_jj * Hinv[j, :],
    and j is eliminated from Hinv by one Gaussian step; the loss of column j is
    (w_j - q_j)^2 / Hinv_jj / 2.

    Args:
        round_column: ``(c, w) -> q``, the column's index in the original order and its (rows,)
            float32 values after the earlier columns' feedback, to their (rows,) rounding.
    Returns:
        ``(Q, losses)`` in the original column order.
    """
    W = W.double().clone()
    H = H.double().clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    cols = W.shape[1]
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    perm = torch.arange(cols) if perm is None else perm
    H = H[perm][:, perm]
    H += percdamp * torch.diagonal(H).mean() * torch.eye(cols, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    Wp = W[:, perm]
    Q = torch.zeros_like(Wp)
    losses = torch.zeros(cols, dtype=torch.float64)
    for j in range(cols):
        q = round_column(int(perm[j]), Wp[:, j].float()).double()
        d = Hinv[j, j]
        err = (Wp[:, j] - q) / d
        Q[:, j] = q
        losses[j] = ((Wp[:, j] - q) ** 2).sum() / d / 2
        Wp[:, j + 1 :] -= err.unsqueeze(1) * Hinv[j, j + 1 :].unsqueeze(0)
        Hinv = Hinv - torch.outer(Hinv[:, j], Hinv[j, :]) / d
    inv = torch.argsort(perm)
    return Q[:, inv], losses[inv]
