"""LayerSync and CREPA with TREAD routing tokens around some blocks of the real tiny Flux transformer:
a block inside a route ran on the kept tokens only, so each term must equal the term written out here
on exactly those tokens (the other block's tokens, or the DINOv2 target after its grid is matched to
the denoiser's, taken at the kept positions); two blocks in two different routes are refused."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from simpletuner.regularizers.base import Regularizers  # noqa: E402
from simpletuner.regularizers.crepa import Crepa, NeighbourSettings  # noqa: E402
from simpletuner.regularizers.layersync import LayerSync  # noqa: E402
from simpletuner.regularizers.schedule import SimilarityGate, WeightSchedule  # noqa: E402
from simpletuner.regularizers.tread import Tread  # noqa: E402
from simpletuner.regularizers.vision_teacher import TeacherFeatures, make_projector  # noqa: E402
from simpletuner.testing.tiny_vision import make_tiny_dinov2  # noqa: E402
from tests.regularizers.test_tread import image_tokens, inputs, routes, tiny_family  # noqa: E402

TOKENS, WIDTH = 16, 32  # the tiny Flux's image tokens (a 4x4 grid over an 8x8 latent) and token width
LATENT = torch.Generator().manual_seed(3)


def routed_forward(regularizers: list, tread: Tread):
    """One training forward of the tiny Flux with ``regularizers`` and ``tread``: every block's image
    tokens as the block computed them (before TREAD puts skipped tokens back) and the kept positions."""
    model = tiny_family("flux")
    outputs = {}
    for index, (_, block) in enumerate(model.transformer_blocks()):  # hooked before TREAD's own hooks
        block.register_forward_hook(lambda m, a, output, index=index: outputs.update({index: image_tokens(output)}))
    attached = Regularizers(regularizers, model)
    torch.manual_seed(11)
    with attached.capturing():
        model.denoiser(**inputs("flux"))
    return outputs, tread.recorded[0].kept


def at_kept(tokens: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """All image tokens cut to the kept ones; a block inside the route already holds only those."""
    return tokens[:, kept] if tokens.shape[1] == TOKENS else tokens


def mean_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    a, b = a.double(), b.double()
    return ((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1))).mean()


# --- LayerSync ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("student, teacher, tread_first", [
    (2, 4, False),  # student inside the route (block 1), teacher after it: the teacher is gathered
    (1, 2, False),  # student before the route, teacher inside it: the student is gathered
    (2, 3, False),  # both inside the route (block 2 is its last): the same kept tokens
    (3, 4, True),   # the route's last block hooked after TREAD, i.e. after the put-back: still its kept tokens
])
def test_layersync_compares_the_kept_tokens(student: int, teacher: int, tread_first: bool):
    tread = Tread(routes(0.5, 1, 2))
    layersync = LayerSync(student_block=student, teacher_block=teacher, weight=0.3)
    outputs, kept = routed_forward([tread, layersync] if tread_first else [layersync, tread], tread)
    term = layersync.term({}, step=0)
    first, second = at_kept(outputs[student - 1], kept), at_kept(outputs[teacher - 1], kept)
    similarity = mean_cosine(first, second)
    assert len(kept) == TOKENS // 2 and outputs[1].shape[1] == len(kept)
    assert term.logs["similarity"] == pytest.approx(similarity.item(), rel=1e-6)
    assert term.loss.item() == pytest.approx(0.3 * (1 - similarity.item()), abs=1e-7)
    assert mean_cosine(first, second.roll(1, dims=1)) < 0.5  # a token paired with another one would show


def test_blocks_in_two_different_routes_are_refused_at_the_first_step():
    tread = Tread({"routes": routes(0.5, 0, 0)["routes"] + routes(0.5, 2, 3)["routes"]})
    layersync = LayerSync(student_block=1, teacher_block=3, weight=0.2)
    routed_forward([layersync, tread], tread)
    with pytest.raises(RuntimeError, match=r"student block \(`--layersync_student_block 1`\) runs inside TREAD "
                                           r"route 0 \(blocks 0\.\.0\) and its teacher block \(`--layersync_teacher_"
                                           r"block 3`\) inside TREAD route 1 \(blocks 2\.\.3\).*move one of the blocks "
                                           "outside every route, or both into the same route"):
        layersync.term({}, step=0)


# --- CREPA -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory) -> Path:
    return make_tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


def crepa(block_index: int, target_width: int, **extra) -> Crepa:
    torch.manual_seed(1)
    return Crepa(block_index=block_index, projector=make_projector(WIDTH, target_width),
                 schedule=WeightSchedule(base=0.5), gate=SimilarityGate(None), neighbours=NeighbourSettings(), **extra)


def interpolated(features: torch.Tensor, side: int, to: int) -> torch.Tensor:
    """(B, side*side, C) patch tokens resized bilinearly to a to x to grid, written out here."""
    grid = features.view(features.shape[0], side, side, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(to, to), mode="bilinear", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(features.shape[0], to * to, -1)


@pytest.mark.parametrize("image_size, spatial_align", [(56, True), (112, True), (112, False)])
def test_crepa_aligns_the_kept_tokens_with_the_target_at_the_same_positions(image_size: int, spatial_align: bool,
                                                                          dinov2_folder: Path):
    teacher = TeacherFeatures(str(dinov2_folder), image_size, "cpu", torch.float32)
    side = teacher.grid[0]  # 4 (the denoiser's grid) or 8 patches a side
    tread = Tread(routes(0.5, 1, 2))
    regularizer = crepa(1, teacher.hidden_size, teacher=teacher, spatial_align=spatial_align)
    outputs, kept = routed_forward([regularizer, tread], tread)
    features = torch.randn(2, side * side, teacher.hidden_size, generator=LATENT)  # cached features
    batch = {"latent_mean": torch.randn(2, 16, 8, 8, generator=LATENT), teacher.batch_key: features}
    term = regularizer.term(batch, step=0)

    projected = copy.deepcopy(regularizer.projector).double()(outputs[1].double())  # the kept tokens only
    if side == 4:
        target = features[:, kept]
    elif spatial_align:
        target = interpolated(features.double(), side, 4)[:, kept]
    else:  # no per-token match: the kept tokens' mean against the whole target's
        projected, target = projected.mean(1, keepdim=True), features.mean(1, keepdim=True)
    similarity = mean_cosine(projected, target)
    assert outputs[1].shape[1] == len(kept) == TOKENS // 2
    assert term.logs["similarity"] == pytest.approx(similarity.item(), abs=1e-6)
    assert term.loss.item() == pytest.approx(-0.5 * similarity.item(), abs=1e-6)


def test_crepa_with_backbone_features_gathers_the_teacher_block_at_the_kept_positions():
    tread = Tread(routes(0.5, 1, 2))
    regularizer = crepa(1, WIDTH, teacher_block_index=3)
    outputs, kept = routed_forward([regularizer, tread], tread)
    term = regularizer.term({"latent_mean": torch.zeros(2, 16, 8, 8)}, step=0)
    projected = copy.deepcopy(regularizer.projector).double()(outputs[1].double())
    similarity = mean_cosine(projected, outputs[3][:, kept])
    assert term.loss.item() == pytest.approx(-0.5 * similarity.item(), abs=1e-6)
