"""Where one Adam(W) first step can be compared between two implementations whose gradients differ by float noise.

On its first step Adam moves an element by ``lr * g / (|g| + eps)`` (plus AdamW's decay): about ``±lr`` whatever the
gradient's size, so an element whose gradient is float noise on both sides may step either way (up to ``2 lr``
apart). A gradient error ``d`` moves the step by at most ``lr * eps * d / |g|^2``; the elements compared are those
where that stays below ``tolerance`` for the measured error, so a different lr, beta, eps or decay still shows.
"""

from __future__ import annotations

from torch import Tensor


def settled_elements(reference_grad: Tensor, grad_error: float, lr: float, eps: float,
                     tolerance: float = 1e-6) -> Tensor:
    """Returns the mask of elements whose first Adam step moves by less than ``tolerance`` under ``grad_error``."""
    return reference_grad.abs() > (lr * eps * grad_error / tolerance) ** 0.5
