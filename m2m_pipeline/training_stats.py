"""How two noisy loss curves are compared (DDP vs one process, accumulation vs a larger batch): the tests and
`make cluster-smoke`'s multi-process training through the Celery executor use the same judgement."""

from __future__ import annotations

import numpy as np


def curves_agree(a: list[float], b: list[float], window: int = 15, z: float = 4.0) -> tuple[bool, dict]:
    """Do the windowed means of two loss curves agree within `z` standard errors, window by window?

    Two runs with the same global batch see different noise (t, eps, drops), so their per-step losses differ;
    what must agree is the expected loss at each point of training. The per-step noise sigma is estimated
    from both runs' residuals around their own window means (pooled; a trend inside a window inflates it,
    which errs on the side of agreeing); a difference of two window means then has standard error
    sigma * sqrt(2 / window).
    """
    n = min(len(a), len(b)) // window * window
    if n < 2 * window:
        raise ValueError(f"need at least {2 * window} steps in both curves, got {len(a)} and {len(b)}")
    wa, wb = np.asarray(a[:n]).reshape(-1, window), np.asarray(b[:n]).reshape(-1, window)
    resid = np.concatenate([(wa - wa.mean(1, keepdims=True)).ravel(), (wb - wb.mean(1, keepdims=True)).ravel()])
    sigma = float(np.sqrt((resid**2).sum() / (resid.size - 2 * wa.shape[0])))
    se = sigma * np.sqrt(2.0 / window)
    diff = wa.mean(1) - wb.mean(1)
    report = {"window_means_a": wa.mean(1).round(4).tolist(), "window_means_b": wb.mean(1).round(4).tolist(),
              "sigma": round(sigma, 4), "se": round(float(se), 4), "z": (np.abs(diff) / se).round(2).tolist()}
    return bool(np.all(np.abs(diff) < z * se)), report
