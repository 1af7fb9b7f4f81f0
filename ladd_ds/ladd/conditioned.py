"""Image-conditioned LADD: inpainting and instruction-based editing (docs/method.md, section 8).

The paper distills both like text-to-image, with the condition given to every network as extra
input channels after the noisy latent: the student's input, the teacher's as discriminator
(reals and re-noised fakes alike) and the teacher's for the distillation target. Only the input
changes, so the variant overrides `LADDSteps.model_input`; the heads, losses and schedules are
the text-to-image ones.
"""

from __future__ import annotations

import torch

from ladd_ds.ladd.steps import LADDSteps
from ladd_ds.models.conditioning import CONDITION_COLUMNS, batch_condition, join_condition


class ConditionedLADDSteps(LADDSteps):
    """LADDSteps for `ladd.task` inpaint or edit: the batch's condition columns (schema.INPAINT,
    schema.EDIT) follow the noisy latent into every transformer call."""

    def __init__(self, cfg, *args, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.task = cfg.ladd.task
        self.condition_columns = CONDITION_COLUMNS[self.task]

    def model_input(self, x: torch.Tensor, batch: dict) -> torch.Tensor:
        return join_condition(x, batch_condition(batch, self.task))  # (B, C + extra, H, W)
