"""An exponential-moving-average (EMA) teacher: theta_teacher <- m * theta_teacher + (1 - m) * theta_student."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from voco.errors import ConfigError

MOMENTUM_SCHEDULES = ("fixed", "cosine")


def cosine_momentum(step: int, total_steps: int, base_momentum: float, final_momentum: float = 1.0) -> float:
    """Momentum rising from ``base_momentum`` at step 0 to ``final_momentum`` at ``total_steps`` along a half cosine
    (BYOL/DINO): ``final - (final - base) * (1 + cos(pi * step / total_steps)) / 2``, constant after the end."""
    progress = min(max(step, 0) / max(total_steps, 1), 1.0)
    return final_momentum - (final_momentum - base_momentum) * (1.0 + math.cos(math.pi * progress)) / 2.0


class EMATeacher(nn.Module):
    """A teacher copy of a module whose parameters follow a student's by EMA; no gradients flow into it.

    Our own rather than ignite's ``EMAHandler``: VoCo's teacher projector is initialised independently
    (not as a copy of the student) and is updated inside the step, before the teacher pass, not on
    ``ITERATION_COMPLETED``.

    Args:
        module: the teacher network (its parameters are frozen here); use `EMATeacher.copy_of(student)`
            for the usual teacher that starts as a copy.
        momentum: m, the base momentum (VoCo: 0.9 every step).
        schedule: ``"fixed"`` (m every update, the reference) or ``"cosine"`` (from m towards
            ``final_momentum`` over ``total_steps`` updates).
        total_steps: number of updates of the run; needed by the cosine schedule.
        final_momentum: where the cosine schedule ends (1.0: the teacher freezes at the end).

    The update counter is a buffer, so the schedule resumes from a checkpoint with the weights.

    >>> teacher = EMATeacher(nn.Linear(2, 2), momentum=0.9)
    >>> teacher.update(nn.Linear(2, 2))
    0.9
    """

    def __init__(self, module: nn.Module, momentum: float = 0.9, schedule: str = "fixed",
                 total_steps: int | None = None, final_momentum: float = 1.0) -> None:
        super().__init__()
        if schedule not in MOMENTUM_SCHEDULES:
            raise ConfigError(f"unknown momentum schedule {schedule!r}; use one of {', '.join(MOMENTUM_SCHEDULES)}.")
        if not 0.0 <= momentum <= 1.0 or not 0.0 <= final_momentum <= 1.0:
            raise ConfigError(f"teacher momentum {momentum} / final momentum {final_momentum} must lie in [0, 1].")
        if schedule == "cosine" and not total_steps:
            raise ConfigError("the cosine momentum schedule needs total_steps (the number of training steps); set it.")
        self.module = module.requires_grad_(False)
        self.base_momentum, self.schedule = float(momentum), schedule
        self.total_steps, self.final_momentum = total_steps, float(final_momentum)
        self.register_buffer("updates", torch.zeros((), dtype=torch.long))

    @classmethod
    def copy_of(cls, student: nn.Module, **kwargs) -> EMATeacher:
        """A teacher that starts as an exact copy of ``student``."""
        return cls(copy.deepcopy(student), **kwargs)

    def current_momentum(self) -> float:
        """The momentum the next `update` uses."""
        if self.schedule == "fixed":
            return self.base_momentum
        return cosine_momentum(int(self.updates), int(self.total_steps), self.base_momentum, self.final_momentum)

    @torch.no_grad()
    def update(self, student: nn.Module, momentum: float | None = None) -> float:
        """theta_t <- m * theta_t + (1 - m) * theta_s for every parameter (buffers are copied); returns m."""
        momentum = self.current_momentum() if momentum is None else float(momentum)
        teacher_parameters, student_parameters = list(self.module.parameters()), list(student.parameters())
        if [p.shape for p in teacher_parameters] != [p.shape for p in student_parameters]:
            raise ValueError("the teacher and the student must have the same parameters in the same order.")
        for teacher_parameter, student_parameter in zip(teacher_parameters, student_parameters):
            teacher_parameter.mul_(momentum).add_(student_parameter.detach(), alpha=1.0 - momentum)
        for teacher_buffer, student_buffer in zip(self.module.buffers(), student.buffers()):
            teacher_buffer.copy_(student_buffer)
        self.updates += 1
        return momentum

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
