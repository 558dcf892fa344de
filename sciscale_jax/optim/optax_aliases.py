"""AdamW (Loshchilov & Hutter, ICLR 2019), Lion (Chen et al. 2023) and Adafactor (Shazeer & Stern 2018), from optax.

Optax has all three algorithms; these factories only call them with what this package's
registry promises for every optimizer: weight decay 0 unless the caller asks (optax's own
defaults are 1e-4 for ``adamw`` and 1e-3 for ``lion``), a ``mask`` argument choosing the
parameters that decay, and argument checks that raise a one-line ``ValueError`` before
anything is traced.
"""

from __future__ import annotations

import optax

from sciscale_jax.optim import _checks


def adamw(learning_rate, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
          weight_decay: float = 0.0, *, mask=None, mu_dtype=None) -> optax.GradientTransformationExtraArgs:
    """``optax.adamw`` with weight decay 0 unless asked.

    Args:
      learning_rate: a finite positive number or a schedule of the step count.
      b1, b2, eps, eps_root: Adam's moment decays and offsets (defaults 0.9, 0.999, 1e-8, 0).
      weight_decay: decoupled decay coefficient; default 0 (no decay).
      mask: which parameters decay: a bool pytree (a prefix of params) or a function
        params -> bool pytree; ``None`` decays every parameter.
      mu_dtype: dtype of the first moment (default: the parameters').

    ``update`` needs ``params`` (optax's ``add_decayed_weights`` step is always present).
    """
    learning_rate = _checks.learning_rate(learning_rate)
    b1, b2 = _checks.beta(b1, "b1"), _checks.beta(b2, "b2")
    eps, eps_root = _checks.non_negative(eps, "eps"), _checks.non_negative(eps_root, "eps_root")
    weight_decay = _checks.non_negative(weight_decay, "weight_decay")
    mask = _checks.decay_mask(mask)
    return optax.adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay=weight_decay, mask=mask)


def lion(learning_rate, b1: float = 0.9, b2: float = 0.99, weight_decay: float = 0.0, *, mask=None,
         mu_dtype=None) -> optax.GradientTransformationExtraArgs:
    """``optax.lion`` with weight decay 0 unless asked (optax's default is 1e-3).

    Args:
      learning_rate: a finite positive number or a schedule of the step count.
      b1, b2: interpolation and momentum decays (defaults 0.9, 0.99, the paper's).
      weight_decay: decoupled decay coefficient; default 0 (no decay).
      mask: which parameters decay, as for :func:`adamw`.
      mu_dtype: dtype of the momentum (default: the parameters').

    ``update`` needs ``params`` (optax's ``add_decayed_weights`` step is always present).
    """
    learning_rate = _checks.learning_rate(learning_rate)
    b1, b2 = _checks.beta(b1, "b1", allow_one=True), _checks.beta(b2, "b2", allow_one=True)
    weight_decay = _checks.non_negative(weight_decay, "weight_decay")
    mask = _checks.decay_mask(mask)
    return optax.lion(learning_rate, b1, b2, mu_dtype, weight_decay=weight_decay, mask=mask)


def adafactor(learning_rate, decay_rate: float = 0.8, eps: float = 1e-30, clipping_threshold: float | None = 1.0,
              momentum: float | None = None, weight_decay: float = 0.0, *, mask=None,
              min_dim_size_to_factor: int = 128, multiply_by_parameter_scale: bool = True,
              factored: bool = True) -> optax.GradientTransformationExtraArgs:
    """``optax.adafactor`` with an explicit, 0 by default, weight decay.

    Args:
      learning_rate: a finite positive number or a schedule of the step count.
      decay_rate: exponent of the second-moment decay 1 − t^(−decay_rate) (default 0.8).
      eps: offset added to g² (default 1e-30).
      clipping_threshold: bound on the update's RMS, ``None`` for none (default 1).
      momentum: first-moment decay in [0, 1), ``None`` for none (the default).
      weight_decay: decoupled decay coefficient; default 0 (no decay step, and then ``update``
        does not need ``params``). As for every optimizer here the decay is scaled by the
        learning rate, θ ← θ − lr·(step + wd·θ); optax's ``weight_decay_rate`` is not
        (θ ← θ − lr·step − rate·θ), so this factory passes rate = lr·wd (a schedule if lr is).
      mask: which parameters decay, as for :func:`adamw` (optax's ``weight_decay_mask``).
      min_dim_size_to_factor, multiply_by_parameter_scale, factored: as in optax (128, True, True).
    """
    learning_rate = _checks.learning_rate(learning_rate)
    decay_rate = _checks.positive(decay_rate, "decay_rate")
    eps = _checks.non_negative(eps, "eps")
    if clipping_threshold is not None:
        clipping_threshold = _checks.positive(clipping_threshold, "clipping_threshold")
    if momentum is not None:
        momentum = _checks.beta(momentum, "momentum")
    weight_decay = _checks.non_negative(weight_decay, "weight_decay")
    mask = _checks.decay_mask(mask)
    min_dim_size_to_factor = _checks.positive_int(min_dim_size_to_factor, "min_dim_size_to_factor")
    if not weight_decay:
        rate = None
    elif callable(learning_rate):
        rate = lambda count: weight_decay * learning_rate(count)  # noqa: E731
    else:
        rate = weight_decay * learning_rate
    return optax.adafactor(learning_rate, min_dim_size_to_factor, decay_rate,
                           multiply_by_parameter_scale=bool(multiply_by_parameter_scale),
                           clipping_threshold=clipping_threshold, momentum=momentum,
                           weight_decay_rate=rate, eps=eps, factored=bool(factored),
                           weight_decay_mask=mask)
