"""LayerSync: pull one transformer block's image tokens toward those of another block of the same model.

Spec 002's LayerSync options: ``--layersync_student_block`` names the block that learns,
``--layersync_teacher_block`` the block whose tokens serve as the (detached) target, by default the
student itself, and ``--layersync_lambda`` (0.2 when unset) weights the term

    lambda * (1 - mean over tokens of cos(student token, teacher token))

so the term is 0 when the two blocks agree and the teacher never receives a gradient through it.
With TREAD, a block inside a route ran on the route's kept tokens only: the other block's tokens are
taken at the same positions (both blocks in one route already hold the same tokens; blocks in two
different routes share no fixed tokens and are refused, see simpletuner/regularizers/routing.py).
A block number from 1 to the number of blocks counts depth (1 = the first block); 0 names the first
block as a 0-based index. Blocks come from the family (``ModelFamily.transformer_blocks``: diffusers'
repeated transformer blocks in execution order), so every transformer family works without code of
its own; UNet families have no such list and are refused at validation.
"""

from __future__ import annotations

import torch.nn.functional as F

from simpletuner.methods.base import Stateless
from simpletuner.regularizers.base import BlockTokens, CaptureSwitch, RegularizerTerm, transformer_blocks_of
from simpletuner.regularizers.routing import on_shared_tokens

#: ``--layersync_lambda`` when left unset.
DEFAULT_LAMBDA = 0.2


def build(model, config) -> LayerSync:
    """``--layersync_enabled`` (the registry's builder)."""
    weight = DEFAULT_LAMBDA if config.layersync_lambda is None else float(config.layersync_lambda)
    teacher = config.layersync_teacher_block
    return LayerSync(student_block=config.layersync_student_block,
                     teacher_block=config.layersync_student_block if teacher is None else teacher, weight=weight)


def block_index(number: int, count: int, option: str) -> int:
    """The 0-based index of block ``number`` among ``count`` (1..count are depths, 0 is the first block)."""
    if 1 <= number <= count:
        return number - 1
    if number == 0:
        return 0
    raise ValueError(f"`--{option}` {number} is past the denoiser's {count} transformer blocks; use 1 to {count}")


class LayerSync(Stateless):
    name = "layersync"

    def __init__(self, student_block: int, teacher_block: int, weight: float):
        self.student_block, self.teacher_block, self.weight = student_block, teacher_block, weight
        self.tokens = BlockTokens()

    def attach(self, model, capture: CaptureSwitch) -> None:
        blocks = transformer_blocks_of(model, "LayerSync")
        self.tokens.hook({"student": blocks[block_index(self.student_block, len(blocks), "layersync_student_block")],
                          "teacher": blocks[block_index(self.teacher_block, len(blocks), "layersync_teacher_block")]},
                         capture)

    def detach(self) -> None:
        self.tokens.remove()

    def term(self, batch: dict, step: int) -> RegularizerTerm | None:
        student, teacher = self.tokens.take("student"), self.tokens.take("teacher")
        if student is None or teacher is None:
            raise RuntimeError("LayerSync captured no block outputs in this forward pass; the denoiser did not "
                               "run the hooked blocks (block swap or compilation replacing them?)")
        student, teacher = on_shared_tokens(
            student, self.tokens.kept("student"), teacher, self.tokens.kept("teacher"),
            names=(f"LayerSync's student block (`--layersync_student_block {self.student_block}`)",
                   f"its teacher block (`--layersync_teacher_block {self.teacher_block}`)"))
        similarity = F.cosine_similarity(student.float(), teacher.detach().float(), dim=-1).mean()
        loss = self.weight * (1 - similarity)
        return RegularizerTerm(loss, {"similarity": similarity.item(), "loss": loss.item()})
