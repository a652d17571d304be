"""Multi-resolution ensemble distillation (MRED), as in RS-Nets (Wang et al., ECCV 2020).

Given the logits z_1..z_n of one batch at resolutions S_1 > ... > S_n:
- the ensemble teacher is sum_j softmax(alpha)_j * stopgrad(z_j); its cross-entropy trains alpha only;
- vanilla: KD from the ensemble to every resolution;
- full: also KD from every higher resolution to every lower one, the KD sum scaled by 2/(n+1).
KD is KL(softmax(teacher/T) || softmax(student/T)) * T^2 (T = 1 in the paper), batch mean, teacher detached.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import choices_error

DISTILL_MODES = ("full", "vanilla", "none")


def kd_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)), mean over the batch, teacher detached.

    The T^2 keeps the gradient's size as T changes (Hinton et al. 2015): d/ds of the KL at T is
    (softmax(s/T) - softmax(t/T)) / T.
    """
    teacher_log_p = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    student_log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
    kl = F.kl_div(student_log_p, teacher_log_p, reduction="batchmean", log_target=True)
    return kl * temperature**2


class EnsembleWeights(nn.Module):
    """The learnable alpha of MRED (initialised to ones; never weight-decayed)."""

    def __init__(self, num_resolutions: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(num_resolutions))
        self.alpha._rsq_no_weight_decay = True

    def weights(self) -> torch.Tensor:
        return torch.softmax(self.alpha, dim=0)

    def ensemble(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """sum_j w_j * stopgrad(z_j): the gradient of this reaches alpha only."""
        w = self.weights()
        return sum(w[j] * z.detach().float() for j, z in enumerate(logits))


@dataclass
class LossParts:
    total: torch.Tensor
    ce: torch.Tensor
    ens: torch.Tensor
    kd: torch.Tensor


def mred_loss(
    logits: list[torch.Tensor],
    target: torch.Tensor,
    ensemble: EnsembleWeights,
    mode: str = "full",
    label_smoothing: float = 0.0,
    teacher_logits: list[torch.Tensor] | None = None,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
) -> LossParts:
    """The RS-Net loss for logits ordered from the largest resolution to the smallest.

    ``teacher_logits`` (optional, one per resolution) adds KD from an external full-precision
    RS-Net at each resolution, on top of MRED. ``kd_weight`` scales the MRED KD terms (a ramp
    keeps an ensemble of untrained students from teaching early on); the ensemble's own
    cross-entropy, which trains alpha only, is never scaled. ``temperature`` is the MRED KD terms'.
    """
    n = len(logits)
    ce = sum(F.cross_entropy(z.float(), target, label_smoothing=label_smoothing) for z in logits)
    zero = ce.new_zeros(())
    if mode == "none":
        ens = kd = zero
    else:
        z_ens = ensemble.ensemble(logits)
        ens = F.cross_entropy(z_ens, target)
        kd = sum(kd_loss(z_ens, z, temperature) for z in logits)
        if mode == "full":
            kd = kd + sum(kd_loss(logits[k], logits[j], temperature) for j in range(n) for k in range(j))
            kd = kd * (2.0 / (n + 1))
        elif mode != "vanilla":
            raise choices_error("distill mode", mode, DISTILL_MODES)
        kd = kd * kd_weight
    if teacher_logits is not None:
        kd = kd + sum(kd_loss(t, z) for t, z in zip(teacher_logits, logits))
    return LossParts(ce + ens + kd, ce.detach(), ens.detach(), kd.detach() if torch.is_tensor(kd) else zero)


class BitWidthEnsembles(nn.Module):
    """One MRED ensemble (its own alpha) per bit width of a model that switches bit widths."""

    def __init__(self, num_resolutions: int, bit_widths: list[int]):
        super().__init__()
        self.bit_widths = list(bit_widths)
        self.by_bits = nn.ModuleDict({f"b{b}": EnsembleWeights(num_resolutions) for b in self.bit_widths})

    def __getitem__(self, bits: int) -> EnsembleWeights:
        return self.by_bits[f"b{bits}"]


def joint_loss(
    logits_by_bits: dict[int, list[torch.Tensor]],
    target: torch.Tensor,
    ensembles: BitWidthEnsembles,
    mode: str = "full",
    label_smoothing: float = 0.0,
    teacher_logits: list[torch.Tensor] | None = None,
    bit_distill: bool = True,
    kd_weight: float = 1.0,
    temperature: float = 1.0,
) -> LossParts:
    """The loss of a model that switches resolution and bit width (docs/methods.md §5).

    MRED within every bit width (each with its own ensemble), plus (``bit_distill``) KD from the
    widest bit width to every narrower one at the same resolution (the teacher detached, as in MRED).
    """
    widest = max(logits_by_bits)
    parts = [mred_loss(logits, target, ensembles[bits], mode, label_smoothing, teacher_logits, kd_weight, temperature)
             for bits, logits in logits_by_bits.items()]
    bit_kd = 0.0
    if bit_distill:
        bit_kd = sum(kd_loss(t, z) for bits, logits in logits_by_bits.items() if bits != widest
                     for t, z in zip(logits_by_bits[widest], logits))
    total = sum(p.total for p in parts) + bit_kd
    ce, ens, kd = (sum(getattr(p, name) for p in parts) for name in ("ce", "ens", "kd"))
    return LossParts(total, ce, ens, kd + (bit_kd.detach() if torch.is_tensor(bit_kd) else 0.0))
