"""TREAD token routing on the real tiny Flux, SD3 and PixArt-Sigma transformers: ratio 0 leaves the
output bit-identical, routed tokens leave the range with the values they entered it with, Flux's
rotary table and key mask follow their tokens, hooks stay silent outside the training forward, the
config rules, CLI runs on the three tiny families, and CLI runs with gradient checkpointing (alone and
with LayerSync and CREPA) whose losses equal those of the same runs without it."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from simpletuner.models.base import ModelFamily  # noqa: E402
from simpletuner.options import ConfigError  # noqa: E402
from simpletuner.regularizers import tread as tread_module  # noqa: E402
from simpletuner.regularizers.base import Regularizers  # noqa: E402
from simpletuner.regularizers.tread import Tread, resolve_routes  # noqa: E402

BATCH, TEXT_TOKENS = 2, 5


def tiny_family(family: str):
    """The real tiny denoiser of ``family``, in eval mode, seen through the family's own block listing."""
    import importlib

    from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

    classes = {"flux": FluxTransformer2DModel, "sd3": SD3Transformer2DModel, "pixart_sigma": PixArtTransformer2DModel}
    settings = importlib.import_module(f"simpletuner.testing.tiny.{family}").TRANSFORMER_CONFIG
    torch.manual_seed(0)
    denoiser = classes[family](**settings).eval()
    model = SimpleNamespace(denoiser=denoiser, block_list_names=ModelFamily.block_list_names,
                            config=SimpleNamespace(model_family=family))
    model.transformer_blocks = lambda: ModelFamily.transformer_blocks(model)
    return model


def inputs(family: str) -> dict:
    """One batch of denoiser inputs: 16 image tokens (a 4x4 grid) and 5 text tokens."""
    generator = torch.Generator().manual_seed(1)
    noise = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    if family == "flux":
        rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
        image_ids = torch.stack([torch.zeros(16), rows.flatten(), cols.flatten()], dim=1).float()
        return dict(hidden_states=noise(BATCH, 16, 64), encoder_hidden_states=noise(BATCH, TEXT_TOKENS, 48),
                    pooled_projections=noise(BATCH, 32), timestep=torch.tensor([0.3, 0.8]),
                    img_ids=image_ids, txt_ids=torch.zeros(TEXT_TOKENS, 3), guidance=torch.tensor([3.5, 3.5]),
                    return_dict=False)
    if family == "sd3":
        from simpletuner.testing.tiny import sd3

        return dict(hidden_states=noise(BATCH, 16, 8, 8), encoder_hidden_states=noise(BATCH, TEXT_TOKENS, 96),
                    pooled_projections=noise(BATCH, sd3.TRANSFORMER_CONFIG["pooled_projection_dim"]),
                    timestep=torch.tensor([300.0, 800.0]), return_dict=False)
    return dict(hidden_states=noise(BATCH, 4, 8, 8), encoder_hidden_states=noise(BATCH, TEXT_TOKENS, 48),
                timestep=torch.tensor([300, 800]), added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                return_dict=False)


def routes(ratio: float, start: int, end: int) -> dict:
    return {"routes": [{"selection_ratio": ratio, "start_layer_idx": start, "end_layer_idx": end}]}


def image_tokens(output):
    return output[-1] if isinstance(output, tuple) else output


FAMILIES = ["flux", "sd3", "pixart_sigma"]


@pytest.mark.parametrize("family", FAMILIES)
def test_ratio_zero_gives_exactly_the_untouched_output(family: str):
    model = tiny_family(family)
    with torch.no_grad():
        untouched = model.denoiser(**inputs(family))[0]
        regularizers = Regularizers([Tread(routes(0.0, 0, -1))], model)
        with regularizers.capturing():
            routed = model.denoiser(**inputs(family))[0]
    assert torch.equal(routed, untouched)
    assert regularizers.items[0].term({}, step=0) is None


@pytest.mark.parametrize("family", FAMILIES)
def test_routed_tokens_skip_the_range_and_kept_tokens_run_it(family: str):
    model = tiny_family(family)
    blocks = [block for _, block in model.transformer_blocks()]
    start, end = (1, 2) if family == "flux" else (0, 0)  # flux: across the double/single boundary
    seen = {}
    def record_entering(module, args, kwargs):
        seen["entering"] = args[0] if args else kwargs["hidden_states"]
    blocks[start].register_forward_pre_hook(record_entering, with_kwargs=True)
    tread = Tread(routes(0.5, start, end))
    # registered before TREAD's own hook: sees what the range produced and which tokens ran it
    def record_range(module, args, output):
        if tread.routed:
            seen.update(ran=image_tokens(output), kept=tread.routed[0].kept.clone())
    blocks[end].register_forward_hook(record_range)
    with torch.no_grad():
        untouched = model.denoiser(**inputs(family))[0]
        regularizers = Regularizers([tread], model)
        blocks[end].register_forward_hook(lambda module, args, output: seen.update(leaving=image_tokens(output)))
        with regularizers.capturing():
            routed = model.denoiser(**inputs(family))[0]
    tokens = seen["entering"].shape[1]
    kept = seen["kept"]
    skipped = torch.tensor(sorted(set(range(tokens)) - set(kept.tolist())))
    assert len(kept) == tokens - int(tokens * 0.5) and seen["ran"].shape[1] == len(kept)
    assert seen["leaving"].shape == seen["entering"].shape
    assert torch.equal(seen["leaving"][:, skipped], seen["entering"][:, skipped])
    assert torch.equal(seen["leaving"][:, kept], seen["ran"])
    assert routed.shape == untouched.shape and not torch.allclose(routed, untouched)
    assert tread.routed == {} and tread.restoring == {}
    assert tread.recorded == {}  # nothing to replay after a no-gradient forward


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_do_nothing_outside_the_training_forward(family: str):
    model = tiny_family(family)
    with torch.no_grad():
        untouched = model.denoiser(**inputs(family))[0]
        regularizers = Regularizers([Tread(routes(0.75, 0, -1))], model)
        state = torch.get_rng_state()
        validation = model.denoiser(**inputs(family))[0]  # validation, evaluation, EMA sampling
        assert torch.equal(torch.get_rng_state(), state)  # no token draw either
        regularizers.detach()
        with regularizers.capturing():
            detached = model.denoiser(**inputs(family))[0]
    assert torch.equal(validation, untouched) and torch.equal(detached, untouched)


def test_flux_rotary_embedding_and_key_mask_travel_with_their_tokens():
    model = tiny_family("flux")
    batch = inputs("flux")
    full_rotary = model.denoiser.pos_embed(torch.cat([batch["txt_ids"], batch["img_ids"]]))
    mask = torch.ones(BATCH, TEXT_TOKENS + 16, dtype=torch.bool)
    mask[0, 3:TEXT_TOKENS] = False  # padded text in the first sample
    mask[:, TEXT_TOKENS:] = torch.arange(16) % 3 != 0  # a distinct pattern over the image tokens
    tread = Tread(routes(0.5, 0, 1))
    seen = {}
    blocks = [block for _, block in model.transformer_blocks()]
    with torch.no_grad():
        regularizers = Regularizers([tread], model)

        def record(module, args, kwargs, index):  # after TREAD's pre-hooks: what each routed block receives
            seen[index] = dict(kwargs, kept=tread.routed[0].kept.clone())
        for index in (0, 1):
            blocks[index].register_forward_pre_hook(lambda m, a, k, index=index: record(m, a, k, index),
                                                    with_kwargs=True)
        with regularizers.capturing():
            model.denoiser(**batch, joint_attention_kwargs={"attention_mask": mask})
    for index in (0, 1):  # the start block and the one after it, which gets the full table again
        kept = seen[index]["kept"]
        positions = torch.cat([torch.arange(TEXT_TOKENS), TEXT_TOKENS + kept])
        cos, sin = seen[index]["image_rotary_emb"]
        assert cos.shape[0] == TEXT_TOKENS + len(kept) < full_rotary[0].shape[0]
        assert torch.equal(cos, full_rotary[0][positions]) and torch.equal(sin, full_rotary[1][positions])
        assert torch.equal(seen[index]["joint_attention_kwargs"]["attention_mask"], mask[:, positions])
        assert seen[index]["hidden_states"].shape[1] == len(kept)


def test_the_token_draw_follows_torchs_global_seed():
    model = tiny_family("sd3")
    tread = Tread(routes(0.5, 0, 1))
    drawn = []
    blocks = [block for _, block in model.transformer_blocks()]
    blocks[0].register_forward_hook(lambda *a: drawn.append(tread.routed[0].kept.clone()))
    with torch.no_grad():
        regularizers = Regularizers([tread], model)
        for seed in (5, 5, 6):
            torch.manual_seed(seed)
            with regularizers.capturing():
                model.denoiser(**inputs("sd3"))
    assert torch.equal(drawn[0], drawn[1]) and not torch.equal(drawn[0], drawn[2])


def test_routes_resolve_negative_indices_and_refuse_bad_ranges():
    assert [(r.start, r.end) for r in resolve_routes(routes(0.5, 1, -1), 4)] == [(1, 3)]
    with pytest.raises(ValueError, match="do not name a range of the denoiser's 4 transformer blocks"):
        resolve_routes(routes(0.5, 3, 1), 4)
    with pytest.raises(ValueError, match="routes overlap"):
        resolve_routes({"routes": routes(0.5, 0, 2)["routes"] + routes(0.5, 2, 3)["routes"]}, 4)


def resolve(project: Path, family: str, **overrides):
    from simpletuner.options.resolve import resolve_run
    from tests.models.conftest import family_args

    return resolve_run(family_args(project, family, "out", **overrides)).config


@pytest.fixture(scope="module")
def flux_project(tmp_path_factory) -> Path:
    from simpletuner.testing.projects import make_family_project

    return make_family_project(tmp_path_factory.mktemp("tread-flux"), "flux")


def test_config_rules(flux_project: Path, tmp_path: Path):
    import json

    from simpletuner.testing.projects import make_family_project

    def refused(value, match, **extra):
        with pytest.raises(ConfigError, match=match):
            resolve(flux_project, "flux", tread_config=json.dumps(value), **extra)

    refused({"route": []}, 'one key, "routes", a non-empty list')
    refused(routes(1.0, 0, 1), r"selection_ratio 1.0 must be a number in \[0, 1\)")
    refused(routes(-0.1, 0, 1), r"selection_ratio -0.1 must be")
    refused(routes(0.5, 0, 4), "end_layer_idx 4 is outside the denoiser's 4 transformer blocks")
    refused(routes(0.5, -1, 1), "start_layer_idx -1 comes after end_layer_idx 1")
    refused({"routes": [{"selection_ratio": 0.5, "start_layer_idx": 0}]}, "exactly the keys")
    refused({"routes": routes(0.5, 0, 1)["routes"] + routes(0.5, 1, 2)["routes"]}, "routes overlap")
    two_routes = {"routes": routes(0.5, 0, 0)["routes"] + routes(0.5, -2, -1)["routes"]}  # blocks 0 and 2..3
    refused(two_routes, r"`--layersync_student_block` 1 is inside `--tread_config` route 0 \(blocks 0\.\.0\) and "
            r"`--layersync_teacher_block` 3 inside route 1 \(blocks 2\.\.3\): the two routes keep different random "
            "tokens.*move one block outside every route, or both into the same route",
            layersync_enabled="true", layersync_student_block=1, layersync_teacher_block=3)
    refused(two_routes, r"`--crepa_block_index` 0 is inside `--tread_config` route 0 \(blocks 0\.\.0\) and "
            r"`--crepa_teacher_block_index` 2 inside route 1 \(blocks 2\.\.3\)", crepa_enabled="true",
            crepa_block_index=0, crepa_use_backbone_features="true", crepa_teacher_block_index=2)
    combined = dict(gradient_checkpointing="true", gradient_checkpointing_interval=2, layersync_enabled="true",
                    layersync_student_block=2, layersync_teacher_block=4)  # one block inside the route, one after
    assert resolve(flux_project, "flux", tread_config=json.dumps(routes(0.5, 1, 2)), **combined).gradient_checkpointing
    assert resolve(flux_project, "flux", tread_config=json.dumps(two_routes), layersync_enabled="true",
                   layersync_student_block=3, layersync_teacher_block=4).layersync_enabled  # both in route 1
    assert resolve(flux_project, "flux", tread_config=json.dumps(two_routes), crepa_enabled="true", crepa_block_index=0,
                   crepa_model="dinov2_vits14").crepa_enabled  # an encoder target is taken at the kept tokens
    with pytest.raises(ConfigError, match="neither inline JSON nor an existing JSON file"):
        resolve(flux_project, "flux", tread_config="missing.json")
    accepted = resolve(flux_project, "flux", tread_config=json.dumps(routes(0.5, 1, -2)))
    assert accepted.tread_config == routes(0.5, 1, -2)
    settings = tmp_path / "tread.json"
    settings.write_text(json.dumps(routes(0.25, 0, 1)), encoding="utf-8")
    assert resolve(flux_project, "flux", tread_config=str(settings)).tread_config == routes(0.25, 0, 1)
    unet = make_family_project(tmp_path / "sd1x", "sd1x")
    with pytest.raises(ConfigError, match="`--tread_config` only applies to sd3, pixart_sigma, flux, not to sd1x"):
        resolve(unet, "sd1x", tread_config=json.dumps(routes(0.5, 0, 1)))


@pytest.mark.parametrize("family", FAMILIES)
def test_cli_runs_route_tokens_and_train(family: str, flux_project: Path, monkeypatch, tmp_path_factory):
    import json

    from simpletuner.cli import main
    from simpletuner.testing.projects import make_family_project
    from tests.models.conftest import family_args, keep_trainer

    project = flux_project if family == "flux" else make_family_project(tmp_path_factory.mktemp(family), family)

    seen = keep_trainer(monkeypatch)
    draws = []
    original = tread_module.draw_kept_positions
    monkeypatch.setattr(tread_module, "draw_kept_positions",
                        lambda tokens, ratio, device: draws.append((tokens, ratio)) or original(tokens, ratio, device))
    argv = family_args(project, family, "tread", tread_config=json.dumps(routes(0.5, 0, -2)))
    assert main(["train", *argv]) == 0
    trainer = seen["trainer"]
    assert [item.name for item in trainer.regularizers.items] == ["tread"]
    losses = trainer.state.losses
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert len(draws) == 3 and all(ratio == 0.5 and tokens > 1 for tokens, ratio in draws)


#: LayerSync with both blocks inside the route, CREPA aligning a block before it with one inside it
ALIGNMENT = dict(layersync_enabled="true", layersync_student_block=2, layersync_teacher_block=4, crepa_enabled="true",
                 crepa_block_index=0, crepa_use_backbone_features="true", crepa_teacher_block_index=2)


@pytest.mark.parametrize("interval, regularizers", [(None, {}), (2, {}), (None, ALIGNMENT)])
def test_cli_run_with_gradient_checkpointing_trains_exactly_like_without(interval: int | None, regularizers: dict,
                                                                        flux_project: Path, monkeypatch):
    import json

    from simpletuner.cli import main
    from tests.models.conftest import family_args, keep_trainer

    draws = []
    original = tread_module.draw_kept_positions
    monkeypatch.setattr(tread_module, "draw_kept_positions",
                        lambda tokens, ratio, device: draws.append(tokens) or original(tokens, ratio, device))
    losses = {}
    for checkpointing in ("false", "true"):
        seen = keep_trainer(monkeypatch)
        argv = family_args(flux_project, "flux", f"tread-gc-{checkpointing}-{interval}-{bool(regularizers)}",
                           tread_config=json.dumps(routes(0.5, 1, -1)), gradient_checkpointing=checkpointing,
                           gradient_checkpointing_interval=interval if checkpointing == "true" else None,
                           **regularizers)
        assert main(["train", *argv]) == 0
        losses[checkpointing] = seen["trainer"].state.losses
    trainer = seen["trainer"]
    assert trainer.model.denoiser.gradient_checkpointing
    expected = ["layersync", "crepa", "tread"] if regularizers else ["tread"]
    assert [item.name for item in trainer.regularizers.items] == expected
    assert len(losses["true"]) == 3 and all(math.isfinite(loss) for loss in losses["true"])
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-6, abs=1e-7)
    assert len(draws) == 6  # one per step in each run: the recomputation replays, it never draws
