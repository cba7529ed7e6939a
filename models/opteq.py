"""OptEq: the equilibrium as the minimiser of an explicit convex objective (Xie, Wang, Ling, Zhang
and Lin, "Optimization induced equilibrium networks", 2022).

The layer is ``T(z; Qx) = prox_f(W z + Qx)`` with ``f`` convex and ``W`` symmetric with
``‖W‖₂ ≤ γ < 1``. Here ``f`` is the indicator of the non-negative orthant, whose proximal operator
is ReLU, so ``T(z) = relu(W z + Qx)``. ``T`` is a proximal-gradient step of size 1 on

    E(z) = ½ zᵀ (I − W) z − ⟨Qx, z⟩ + f(z)

(the smooth part has gradient ``(I − W) z − Qx``, so ``z − ∇ = W z + Qx``). Because ``I − W ⪰
(1 − γ) I``, ``E`` is ``(1 − γ)``-strongly convex and has exactly one minimiser; the fixed points of
``T`` are exactly the points where ``0 ∈ ∂E``, so **the equilibrium is the minimiser of E**. Since
the smooth part's gradient is ``‖I − W‖ ≤ 1 + γ < 2``-Lipschitz, every Picard step decreases it:

    E(T(z)) ≤ E(z) − (1 − γ)/2 · ‖T(z) − z‖²

(the standard proximal-gradient descent inequality with step 1 and Lipschitz constant 1 + γ).
``T`` is also a contraction (``Lip ≤ ‖W‖ ≤ γ``), so the FPN machinery (solvers, JFB, IFT) applies;
the default backprop is JFB (the paper differentiates implicitly: ``--backprop ift``).
:meth:`OptEqClassifier.objective` exposes ``E``.

The symmetric, norm-bounded parametrisation: ``W = γ · (K + Kᵀ) / 2`` with ``K`` a bias-free linear
map normalised to spectral norm 1 (a 3×3 convolution with its exact adjoint ``conv_transpose2d``
for images, a dense matrix otherwise); ``‖W‖ ≤ γ (‖K‖ + ‖Kᵀ‖)/2 = γ``. Injection and readout are
the FPN's.

>>> import torch
>>> from models import ArchConfig, InputSpec, ModelConfig, create_model
>>> model = create_model(ModelConfig(family="opteq", arch=ArchConfig(kind="mlp", width=8),
...                                  input=InputSpec(shape=(5,)))).double().eval()
>>> model.tighten_lipschitz()
>>> x = torch.rand(2, 5, dtype=torch.float64)
>>> out = model.predict(x, tol=1e-10, max_iter=200)
>>> qx = model.inject(x)
>>> nearby = out.z + 1e-3 * torch.rand_like(out.z)
>>> bool((model.objective(out.z, qx) <= model.objective(nearby, qx)).all())
True
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .families import register_family
from .implicit import FixedPointClassifier, ImplicitClassifier
from .operators import OperatorFn, SpectralNormalizedMap, _kaiming
from .options import resolve_options

DEFAULT_OPTIONS: dict = {}


class SymmetricOperator(nn.Module):
    """``T(z; Qx) = relu(W z + Qx)`` with ``W = γ (K + Kᵀ)/2``, ``‖K‖₂ = 1``.

    ``state_shape`` is one sample's state: ``(C, H, W)`` (``K`` a 3×3 convolution) or ``(D,)``.
    """

    def __init__(self, state_shape: tuple[int, ...], gamma: float) -> None:
        super().__init__()
        self.gamma = gamma
        if len(state_shape) == 3:
            c = state_shape[0]
            self.k = SpectralNormalizedMap(_kaiming(c, c, 3), state_shape, padding=1)
        else:
            weight = torch.empty(state_shape[0], state_shape[0])
            nn.init.orthogonal_(weight)
            self.k = SpectralNormalizedMap(weight, state_shape)

    def linear(self) -> Callable[[Tensor], Tensor]:
        """``z ↦ W z`` with the weights normalised once for this pass (one power-iteration step
        when training)."""
        weight = self.k.normalized_weight()
        k, gamma = self.k, 0.5 * self.gamma

        def W(z: Tensor) -> Tensor:  # (B, *state) -> (B, *state)
            return gamma * (k.apply_map(z, weight) + k.apply_adjoint(z, weight))

        return W

    def prepare(self) -> OperatorFn:
        W = self.linear()

        def T(z: Tensor, qx: Tensor) -> Tensor:
            return F.relu(W(z) + qx)

        return T

    def maps(self) -> list[SpectralNormalizedMap]:
        return [self.k]


class OptEqClassifier(FixedPointClassifier):
    """The FPN's injection and readout around :class:`SymmetricOperator` (module docstring)."""

    operator: SymmetricOperator

    def __init__(self, config: ModelConfig) -> None:
        config = resolve_options(config, DEFAULT_OPTIONS, "opteq")
        super().__init__(config)
        arch, in_shape = config.arch, config.input.shape
        state: tuple[int, ...]
        if arch.kind == "conv":
            state = (arch.channels, (in_shape[1] + 1) // 2, (in_shape[2] + 1) // 2)
        else:
            state = (arch.width,)
        self.operator = SymmetricOperator(state, arch.gamma)

    @torch.no_grad()
    def objective(self, z: Tensor, qx: Tensor) -> Tensor:
        """``E(z) = ½⟨z, (I − W) z⟩ − ⟨Qx, z⟩`` per sample, ``+inf`` where ``z`` has a negative
        entry (outside the domain of ``f``). (B, *state) × (B, *state) -> (B,)."""
        W = self.operator.linear()
        z_flat, wz, q = z.flatten(1), W(z).flatten(1), qx.flatten(1)
        value = 0.5 * (z_flat * (z_flat - wz)).sum(1) - (q * z_flat).sum(1)
        feasible = (z_flat >= 0).all(1)
        return torch.where(feasible, value, torch.full_like(value, float("inf")))


@register_family(
    "opteq",
    default_backprop="jfb",
    description="OptEq (Xie et al.): T = relu(Wz + Qx) with W symmetric, ||W|| <= gamma, the "
    "proximal-gradient step of a convex objective whose minimiser is the equilibrium",
)
def _opteq(config: ModelConfig) -> ImplicitClassifier:
    return OptEqClassifier(config)
