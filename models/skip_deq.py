"""Skip DEQ and Skip Reg. DEQ (Pal, Edelman and Rackauckas, "Mixing implicit and explicit deep
learning with skip DEQs and infinite time neural ODEs (continuous DEQs)", 2022).

A DEQ spends most of its solve walking from an uninformed start (zeros) to ``z*``. A Skip DEQ
learns where to start: an explicit predictor ``g`` gives the first iterate ``z0 = g(x)`` and is
trained jointly with the implicit model on

    loss = CE(S(z*), y) + w · mean_batch ‖g(x) − z*‖₂

so at inference the solver starts next to the answer and reaches the same tolerance in fewer
applications of ``T``. Two variants (``options["skip_variant"]``):

- ``skip``: ``g(x) = G(Q(x))``, a small explicit network (two 3×3 convs, or two dense layers, with
  ReLU: ``z*`` of a ReLU operator is non-negative) on the injected features ``Q(x)``, so the
  predictor shares the injection instead of re-encoding the image.
- ``skip-reg`` (Skip Reg. DEQ): no extra network; ``z0 = T(0; Q(x))``, one application of the
  operator from zero, and the same regulariser pulls ``z*`` toward it. It adds no parameters.

The operator, injection and readout are the FPN's (``models.implicit.FixedPointClassifier``), so a
``skip-deq`` model and an ``fpn`` model with the same ``arch`` differ only in ``z0`` and the
training loss. ``iterations`` counts applications of ``T`` after ``z0``; the predictor's cost is
not an iteration (it is paid once per sample, and shows in images/s).

Both sides of ``‖g(x) − z*‖`` carry gradients: ``g`` learns to predict ``z*`` and, through the
backprop mode's ``z``, ``z*`` is pulled toward what is cheap to predict (the regularising effect
the paper reports).

>>> from models import ArchConfig, InputSpec, ModelConfig, create_model
>>> config = ModelConfig(family="skip-deq", arch=ArchConfig(kind="mlp", width=16),
...                      input=InputSpec(shape=(12,)), options={"skip_variant": "skip-reg"})
>>> model = create_model(config)
>>> model.config.options["skip_variant"], model.config.options["skip_weight"]
('skip-reg', 0.01)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .config import ModelConfig
from .families import register_family
from .implicit import FixedPointClassifier, ImplicitClassifier
from .operators import OperatorFn
from .options import resolve_options

SKIP_VARIANTS = ("skip", "skip-reg")
DEFAULT_OPTIONS = {"skip_variant": "skip", "skip_weight": 0.01}


class SkipDEQClassifier(FixedPointClassifier):
    """An FPN whose solve starts from a learned guess; see the module docstring."""

    def __init__(self, config: ModelConfig) -> None:
        config = resolve_options(config, DEFAULT_OPTIONS, "skip-deq")
        super().__init__(config)
        options = config.options
        self.variant = options["skip_variant"]
        if self.variant not in SKIP_VARIANTS:
            raise ValueError(
                f"unknown skip_variant {self.variant!r}; available: {list(SKIP_VARIANTS)}"
            )
        self.skip_weight = float(options["skip_weight"])
        if self.skip_weight < 0:
            raise ValueError(f"skip_weight must be >= 0, got {self.skip_weight}")
        self._pass_operator: OperatorFn | None = None
        self.predictor: nn.Module | None = None
        if self.variant == "skip":
            self.predictor = _predictor(config)

    def prepare_operator(self) -> OperatorFn:
        """As the base class, and remembered: skip-reg's ``z0 = T(0; Qx)`` must use this pass's
        ``T`` (preparing another one in training would step the spectral-norm power iteration,
        in place, under the graph of the first)."""
        self._pass_operator = super().prepare_operator()
        return self._pass_operator

    def initial_state(self, x: Tensor, qx: Tensor) -> Tensor:
        """``g(x)`` (skip) or ``T(0; Qx)`` (skip-reg): the shape of the state."""
        if self.predictor is not None:
            return self.predictor(qx)
        T = self._pass_operator or self.prepare_operator()
        return T(torch.zeros_like(qx), qx)

    def auxiliary_loss(self, x: Tensor, qx: Tensor, z: Tensor) -> Tensor | None:
        """``w · mean_b ‖z0_b − z_b‖₂``, ``z`` the backprop mode's differentiable fixed point."""
        if self.skip_weight == 0.0:
            return None
        guess = self.initial_state(x, qx)
        return self.skip_weight * (guess - z).flatten(1).norm(dim=1).mean()


def _predictor(config: ModelConfig) -> nn.Module:
    arch = config.arch
    if arch.kind == "conv":
        c = arch.channels
        return nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1), nn.ReLU()
        )
    w = arch.width
    return nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU())


@register_family(
    "skip-deq",
    default_backprop="jfb",
    description="Skip DEQ (Pal et al.): a learned z0 = g(x) (or T(0; Qx), skip-reg) warm-starts "
    "the solve; options skip_variant, skip_weight",
)
def _skip_deq(config: ModelConfig) -> ImplicitClassifier:
    return SkipDEQClassifier(config)
