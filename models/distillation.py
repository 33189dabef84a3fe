"""Knowledge distillation loss (Hinton et al. 2015) as used by the Bag of Tricks (He et al., CVPR 2019,
Sec. 5.3) and GluonCV's ``DistillationSoftmaxCrossEntropyLoss``:

    loss = hard_weight * CE(z, y) + (1 - hard_weight) * T^2 * CE(softmax(r / T), softmax(z / T))

z: student logits, r: teacher logits, y: the (hard or soft) target, T: temperature. CE(q, softmax(s))
= -sum_k q_k log softmax(s)_k (averaged over the batch; ``models.montage_losses.soft_cross_entropy``, which
also takes the hard target as class indices); it differs from the KL divergence only by the
teacher's entropy, a constant for the student. The T^2 factor keeps the soft term's gradient scale
independent of T. hard_weight 0.5 is GluonCV's ImageNet setting, T = 20 the paper's.

`load_teacher` reads the frozen teacher (a `models.classifier.Classifier`) from a supervised run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from common.errors import UserError
from models.classifier import Classifier
from models.export import load_weights
from models.montage_losses import soft_cross_entropy
from models.tricks import build_backbone


def distillation_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    target: torch.Tensor,
    temperature: float = 20.0,
    hard_weight: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, hard term, soft term) of the formula in the module docstring. The teacher gets no gradient."""
    if not 0.0 <= hard_weight <= 1.0:
        raise ValueError(f"hard_weight must be in [0, 1], got {hard_weight}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    t = float(temperature)
    hard = soft_cross_entropy(student, target)
    soft_target = F.softmax(teacher.detach().float() / t, dim=-1)
    soft = (t * t) * soft_cross_entropy(student.float() / t, soft_target)
    return hard_weight * hard + (1.0 - hard_weight) * soft, hard, soft


def load_teacher(path: str | Path) -> Classifier:
    """A frozen, eval-mode classifier from a supervised run folder (its checkpoints/last.ckpt) or a
    Lightning checkpoint of `SupervisedModule` (its config is read from the checkpoint)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise UserError(f"model.distill.teacher: checkpoint not found: {path}")
    ckpt = load_weights(path, "model.distill.teacher checkpoint")  # weights_only=True: a user's path runs no code
    try:
        cfg = OmegaConf.create(ckpt["hyper_parameters"]["config"])
        state = ckpt["state_dict"]
    except (KeyError, TypeError, RuntimeError) as exc:
        raise UserError(f"model.distill.teacher: {path} is not a checkpoint of a supervised run ({exc})") from exc
    if "head.weight" not in state:
        raise UserError(f"model.distill.teacher: {path} has no classifier (head.weight); train the teacher with "
                        "--method supervised")
    teacher = Classifier(build_backbone(cfg.model), int(state["head.weight"].shape[0]))
    own = {k: v for k, v in state.items() if k.startswith(("backbone.", "head."))}
    missing, unexpected = teacher.load_state_dict(own, strict=False)
    if missing or unexpected:
        raise UserError(f"model.distill.teacher: {path} does not match its config (missing {missing[:4]}, "
                        f"unexpected {unexpected[:4]})")
    teacher.eval().requires_grad_(False)
    return teacher
