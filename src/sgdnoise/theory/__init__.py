"""Theory behind the study: the noisy quadratic model and the gradient noise scale.

* :mod:`sgdnoise.theory.nqm`: exact expected loss of SGD / heavy ball on the noisy quadratic
  model of Zhang et al. (2019), its closed forms, and learning-rate searches on it.
* :mod:`sgdnoise.theory.noise_scale`: the gradient noise scale B_simple of McCandlish et al.
  (2018) from gradient norms at two batch sizes, and the window that measures it in training.

Importing them is cheap: torch is imported only where the window works on tensors.
"""

from sgdnoise.theory.noise_scale import NoiseWindow, estimate
from sgdnoise.theory.nqm import (
    NQMConfig,
    expected_loss,
    recorded_steps,
    run,
    search_lr,
    spectrum,
    steady_state_loss,
    steps_to_target,
)

__all__ = [
    "NQMConfig",
    "NoiseWindow",
    "estimate",
    "expected_loss",
    "recorded_steps",
    "run",
    "search_lr",
    "spectrum",
    "steady_state_loss",
    "steps_to_target",
]
