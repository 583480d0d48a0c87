"""HiDream on its tiny offline model: prompt encoding against diffusers' own pipeline (four encoders, only
the Llama layers the blocks read cached), the model call (timestep, negated output, training-mode
unpatchify), the flow objective with the checkpoint's shift, the token budget of non-square images,
gradient checkpointing, the load-balancing loss, config rules, ``plan-memory``, and real runs through
the CLI (LoRA with validation loaded by ``HiDreamImagePipeline.load_lora_weights``, the ComfyUI layout,
full training saving a pipeline diffusers loads, quantized bases)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.cli import main  # noqa: E402
from simpletuner.testing.config import make_config  # noqa: E402
from tests.models.conftest import (  # noqa: E402
    FamilyHarness,
    check_checkpointing_keeps_gradients,
    check_loss_regresses_eps_minus_x0,
    check_trained,
    check_validation_images,
    recorded_flow_loss,
    saved_lora_keys,
    tiny_pipeline,
)

FAMILY = "hidream"
PROMPT = "a red circle on a white background"
#: The tiny scheduler's shift, the one HiDream-I1-Full ships.
RELEASED_SHIFT = 3.0


HARNESS = FamilyHarness(FAMILY)
project = HARNESS.project_fixture()
hidream_model, config_for, error_of, run_cli = HARNESS.model, HARNESS.config, HARNESS.error, HARNESS.run


@pytest.fixture(scope="module")
def model(project):
    return hidream_model(project / "model")


@pytest.fixture(scope="module")
def pipeline(project):
    from diffusers import HiDreamImagePipeline

    return tiny_pipeline(HiDreamImagePipeline, project / "model")


# --- the tiny model and text encoding ---------------------------------------------------------------


def test_tiny_model_is_a_hidream_pipeline(project, pipeline):
    transformer = pipeline.transformer
    assert [type(pipeline.text_encoder).__name__, type(pipeline.text_encoder_2).__name__,
            type(pipeline.text_encoder_3).__name__, type(pipeline.text_encoder_4).__name__] == [
        "CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel", "LlamaForCausalLM"]
    assert len(transformer.double_stream_blocks) == 1 and len(transformer.single_stream_blocks) == 2
    # one Llama layer per block, not all of them; CLIP widths differ so a swap fails loudly
    assert transformer.config.llama_layers == [1, 2, 2] and pipeline.text_encoder_4.config.num_hidden_layers == 3
    assert pipeline.text_encoder.config.hidden_size != pipeline.text_encoder_2.config.hidden_size
    assert type(transformer.double_stream_blocks[0].block.ff_i).__name__ == "MOEFeedForwardSwiGLU"
    assert pipeline.scheduler.config.shift == RELEASED_SHIFT
    assert json.loads((project / "model" / "simpletuner_tiny_model.json").read_text())["family"] == FAMILY


def test_prompt_embeds_equal_the_pipelines_own_encoding(model, pipeline):
    prompts = [PROMPT, "a blue square"]
    with torch.no_grad():
        t5, negative_t5, llama, negative_llama, pooled, negative_pooled = pipeline.encode_prompt(
            prompts, device=torch.device("cpu"), max_sequence_length=128)
    ours = model.encode_prompts(prompts)
    assert set(ours) == {"pooled_prompt_embeds", "t5_embeds", "llama_embeds"}
    assert ours["llama_embeds"].shape == (2, 2, 128, 24)  # only Llama layers 1 and 2 of 0..2, the ones blocks read
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled)
    torch.testing.assert_close(ours["t5_embeds"], t5)
    # the pipeline keeps every layer [layers, B, tokens, width]; the cache keeps the read ones, batch first
    torch.testing.assert_close(ours["llama_embeds"], llama[[1, 2]].transpose(0, 1))
    empty = model.encode_prompts(["", ""])
    torch.testing.assert_close(empty["pooled_prompt_embeds"], negative_pooled)
    torch.testing.assert_close(empty["llama_embeds"], negative_llama[[1, 2]].transpose(0, 1))


def test_tokenizer_max_length_sets_the_caption_length_and_the_cache_key(project, model):
    short = hidream_model(project / "model", tokenizer_max_length=32)
    embeds = short.encode_prompts([PROMPT])
    assert embeds["t5_embeds"].shape == (1, 32, 40) and embeds["llama_embeds"].shape == (1, 2, 32, 24)
    assert short.pipeline_call_arguments() == {"max_sequence_length": 32}  # validation reads the same length
    assert model.fingerprint_parts()["max_tokens"] == "128" and short.fingerprint_parts()["max_tokens"] == "32"


def test_llama_comes_from_the_model_folder_or_else_from_meta_llama(project, model, tmp_path):
    from simpletuner.models.hidream import LLAMA_MODEL

    assert model.llama_source()[0] == str(project / "model")
    folder = tmp_path / "without-llama"
    shutil.copytree(project / "model", folder, ignore=shutil.ignore_patterns("text_encoder_4", "tokenizer_4"))
    from simpletuner.models.hidream import HiDream

    bare = HiDream(make_config(model_family=FAMILY, pretrained_model_name_or_path=str(folder)), torch.device("cpu"),
                   torch.float32)
    assert bare.llama_source() == (LLAMA_MODEL, None, {}) and LLAMA_MODEL == "meta-llama/Llama-3.1-8B-Instruct"
    assert bare.fingerprint_parts()["llama"] == LLAMA_MODEL


@pytest.mark.parametrize("options, size", [({}, (64, 64)), ({"validation_resolution": "128x64,64"}, (128, 64)),
                                           ({"resolution": 0.0144, "resolution_type": "area"}, (128, 112))])
def test_validation_pipeline_samples_at_the_requested_size(project, model, options, size):
    """The stock pipeline scales every request to one area; the family sets it to the validation size."""
    from simpletuner.models.hidream import HiDream

    config = make_config(**{"model_family": FAMILY, "pretrained_model_name_or_path": str(project / "model"),
                            "resolution": 64, "resolution_type": "pixel", **options})
    family = HiDream(config, torch.device("cpu"), torch.float32)
    family.__dict__.update({name: getattr(model, name) for name in (
        "transformer", "denoiser", "vae", "_scheduler", "tokenizer", "tokenizer_2", "tokenizer_3", "tokenizer_4",
        "text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")})
    pipeline = family.build_pipeline()
    pipeline.set_progress_bar_config(disable=True)
    with torch.no_grad():
        image = pipeline(PROMPT, num_inference_steps=1, width=size[0], height=size[1], output_type="pt",
                         generator=torch.Generator().manual_seed(0)).images
    assert tuple(image.shape[-2:]) == (size[1], size[0])


# --- latents, the model call and the objective --------------------------------------------------------


def test_latents_are_shifted_and_scaled(model):
    mean = torch.randn(2, 16, 8, 8)
    latents = model.latents_from_cache({"latent_mean": mean, "latent_std": torch.zeros_like(mean)})
    config = model.vae.config
    torch.testing.assert_close(latents, (mean - config.shift_factor) * config.scaling_factor)
    assert model.encode_images(torch.zeros(1, 3, 64, 64))["latent_mean"].shape == (1, 16, 8, 8)
    assert model.pixels_per_token() == 16  # 8 px per latent cell x 2x2 patches


@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (2, 16, 8, 4)])
def test_predict_is_the_negated_transformer_output_in_training_and_inference_mode(model, shape):
    """The pipeline feeds ``t`` (0..1000) and negates the output before the Euler step; in training mode
    the transformer hands back patch tokens, which predict puts back in place (square and padded non-square)."""
    torch.manual_seed(0)
    latents = torch.randn(*shape)
    text = model.encode_prompts([PROMPT, ""])
    arguments = dict(encoder_hidden_states_t5=text["t5_embeds"],
                     encoder_hidden_states_llama3=model.llama_states(text["llama_embeds"]),
                     pooled_embeds=text["pooled_prompt_embeds"], return_dict=False)
    with torch.no_grad():
        model.denoiser.eval()
        direct = model.denoiser(hidden_states=latents, timesteps=torch.tensor([300.0, 800.0]), **arguments)[0]
        inference = model.predict(latents, torch.tensor([300.0, 800.0]), text)
        model.denoiser.train()
        try:
            training = model.predict(latents, torch.tensor([300.0, 800.0]), text)
            raw = model.denoiser(hidden_states=latents, timesteps=torch.tensor([300.0, 800.0]), **arguments)[0]
        finally:
            model.denoiser.eval()
    assert raw.shape != latents.shape  # training mode returns [B, C, tokens, patch * patch]
    torch.testing.assert_close(inference, -direct)
    # the training path routes tokens with a different (differentiable) expert loop: same numbers
    torch.testing.assert_close(training, inference, rtol=1e-4, atol=1e-5)


def test_non_square_images_beyond_the_token_budget_are_refused(model):
    # max_resolution 16x16 latent cells: 64 tokens for a non-square image; squares are not padded
    model.predict(torch.randn(1, 16, 16, 12), torch.tensor([500.0]), model.encode_prompts([PROMPT]))
    model.predict(torch.randn(1, 16, 20, 20), torch.tensor([500.0]), model.encode_prompts([PROMPT]))
    with pytest.raises(ValueError, match=r"non-square image of 128x160 px needs 80 tokens.* at most 64 .* "
                                         r"at most 128x128 px"):
        model.predict(torch.randn(1, 16, 20, 16), torch.tensor([500.0]), model.encode_prompts([PROMPT]))


@pytest.mark.parametrize("shift, median", [(None, RELEASED_SHIFT * 0.5 / (1 + (RELEASED_SHIFT - 1) * 0.5)),
                                           (1.0, 0.5)])
def test_flow_objective_uses_the_checkpoints_shift(project, model, monkeypatch, shift, median):
    """x_s = (1 - s) x0 + s eps regressing eps - x0; the logit-normal sigmas (median 0.5) are shifted by
    the checkpoint scheduler's 3.0 unless --flow_schedule_shift says otherwise."""
    config = config_for(project, **({"flow_schedule_shift": shift} if shift else {}))
    loss, sigmas, noisy, mean = recorded_flow_loss(model, config, PROMPT, (16, 2, 2), monkeypatch)
    assert abs(float(sigmas.median()) - median) < 0.05
    config = model.vae.config
    x0 = (mean - config.shift_factor) * config.scaling_factor
    check_loss_regresses_eps_minus_x0(loss, sigmas, noisy, x0)


def test_default_shift_is_read_from_the_checkpoints_scheduler(project, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(project / "model", folder)
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = json.loads(scheduler_file.read_text())
    scheduler_file.write_text(json.dumps({**scheduler, "shift": 6.0}))  # HiDream-I1-Dev's
    assert hidream_model(project / "model").default_flow_shift == RELEASED_SHIFT
    assert hidream_model(folder).default_flow_shift == 6.0
    # a flow UniPC scheduler (what diffusers suggests for sampling HiDream-I1-Full) names its shift flow_shift
    scheduler_file.write_text(json.dumps({"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000,
                                          "use_flow_sigmas": True, "prediction_type": "flow_prediction",
                                          "flow_shift": 5.0}))
    unipc = hidream_model(folder)
    assert type(unipc.noise_scheduler()).__name__ == "UniPCMultistepScheduler" and unipc.default_flow_shift == 5.0
    assert type(unipc.build_pipeline().scheduler).__name__ == "UniPCMultistepScheduler"


def test_gradient_checkpointing_every_nth_block_keeps_the_gradients(project):
    def training_model():
        model = hidream_model(project / "model")
        model.denoiser.train()
        return model

    # one dual-stream and two single-stream blocks, counted in one sequence: every block, or blocks 0 and 2;
    # the transformer hands every block to the checkpointing function, which recomputes some
    plain = check_checkpointing_keeps_gradients(training_model, (2, 16, 8, 8), PROMPT, checkpointed={1: 3, 2: 2},
                                                handed_blocks=3)
    assert plain and all(grad.abs().sum() > 0 for name, grad in plain.items() if "lora_B" in name)


def test_block_lists_run_dual_stream_then_single_stream_blocks(model):
    names = [name for name, _ in model.transformer_blocks()]
    assert names == ["double_stream_blocks.0", "single_stream_blocks.0", "single_stream_blocks.1"]
    assert len(model.router_gates()) == 3  # one mixture-of-experts router per block


# --- the load-balancing loss ---------------------------------------------------------------------------


def balancing_term(model, weight: float | None):
    """The load-balancing term of one training forward, its gate gradient, and the plain loss."""
    from simpletuner.regularizers.base import Regularizers
    from simpletuner.regularizers.load_balancing import build

    config = make_config(model_family=FAMILY, hidream_use_load_balancing_loss=True,
                         hidream_load_balancing_loss_weight=weight)
    regularizers = Regularizers([build(model, config)], model)
    model.denoiser.train()
    model.denoiser.zero_grad(set_to_none=True)
    try:
        torch.manual_seed(0)
        text = model.encode_prompts([PROMPT, ""])
        with regularizers.capturing():
            prediction = model.predict(torch.randn(2, 16, 8, 8), torch.tensor([300.0, 800.0]), text)
        from simpletuner.methods.base import LossOutput

        output = regularizers.add_terms(LossOutput(prediction.square().mean() * 0, {}), {}, 0)
        output.loss.backward()
        gate = model.router_gates()[0].weight
        return output, gate.grad.clone()
    finally:
        regularizers.detach()
        model.denoiser.eval()
        model.denoiser.zero_grad(set_to_none=True)


def test_load_balancing_loss_is_positive_scales_with_its_weight_and_reaches_the_gates(project):
    model = hidream_model(project / "model")  # its own copy: the gates get gradients here
    default, default_grad = balancing_term(model, None)
    tenfold, tenfold_grad = balancing_term(model, 0.1)
    balance = default.logs["load_balancing/balance"]
    # per router sum_i P_i f_i, 1.0 for perfectly even routing; three routers; the default weight is 0.01
    assert 0.9 < balance < 4 and default.logs["load_balancing/loss"] == pytest.approx(0.01 * 3 * balance, rel=1e-5)
    assert float(default.loss) > 0
    torch.testing.assert_close(tenfold.loss, default.loss * 10, rtol=1e-5, atol=0)
    assert default_grad.abs().sum() > 0  # through the router probabilities
    torch.testing.assert_close(tenfold_grad, default_grad * 10, rtol=1e-4, atol=1e-9)


def test_load_balancing_records_only_during_the_training_forward(project, model):
    from simpletuner.regularizers.base import Regularizers
    from simpletuner.regularizers.load_balancing import LoadBalancing

    regularizers = Regularizers([LoadBalancing(0.01)], model)
    try:
        model.denoiser.train()
        with torch.no_grad():
            model.predict(torch.randn(1, 16, 8, 8), torch.tensor([500.0]), model.encode_prompts([PROMPT]))
        assert regularizers.items[0].balances == []  # outside ``capturing``: validation, evaluation
        model.denoiser.eval()
        with regularizers.capturing(), torch.no_grad():
            model.predict(torch.randn(1, 16, 8, 8), torch.tensor([500.0]), model.encode_prompts([PROMPT]))
        with pytest.raises(RuntimeError, match="only in training mode"):
            regularizers.items[0].term({}, 0)
    finally:
        regularizers.detach()
        model.denoiser.eval()


# --- config rules ----------------------------------------------------------------------------------


def test_flavours_name_the_released_models():
    from simpletuner.models.hidream import HiDream

    for flavour, hub_id in ((None, "HiDream-ai/HiDream-I1-Full"), ("full", "HiDream-ai/HiDream-I1-Full"),
                            ("dev", "HiDream-ai/HiDream-I1-Dev"), ("fast", "HiDream-ai/HiDream-I1-Fast")):
        config = make_config(model_family=FAMILY, model_flavour=flavour)
        model = HiDream(config, torch.device("cpu"), torch.float32)
        assert model.model_path == hub_id and model.prediction_type == "flow_matching"


def test_hidream_options_are_accepted_and_refused_elsewhere(project):
    config = config_for(project, tokenizer_max_length=77, model_flavour="dev", lora_format="comfyui",
                        hidream_use_load_balancing_loss="true", hidream_load_balancing_loss_weight=0.1,
                        pretrained_transformer_model_name_or_path=str(project / "model"),
                        pretrained_transformer_subfolder="transformer")
    assert (config.tokenizer_max_length, config.model_flavour, config.lora_format) == (77, "dev", "comfyui")
    assert (config.hidream_use_load_balancing_loss, config.hidream_load_balancing_loss_weight) == (True, 0.1)
    assert error_of(project, family="flux", hidream_use_load_balancing_loss="true").startswith(
        "`--hidream_use_load_balancing_loss` only applies to ")


@pytest.mark.parametrize("overrides, message", [
    ({"train_text_encoder": "true"}, "HiDream's four text encoders stay frozen"),
    ({"prediction_type": "epsilon"}, "`--prediction_type epsilon` is not supported for hidream; use one of: "
                                     "flow_matching"),
    ({"model_flavour": "v9"}, "`--model_flavour v9` is not a flavour of hidream; choose one of: full, dev, fast"),
    ({"hidream_load_balancing_loss_weight": -1, "hidream_use_load_balancing_loss": "true"},
     "hidream_load_balancing_loss_weight"),
    ({"hidream_load_balancing_loss_weight": 0.1}, "`--hidream_load_balancing_loss_weight` has no effect without "
                                                   "`--hidream_use_load_balancing_loss true`"),
    ({"snr_gamma": 5}, "`--snr_gamma` is defined on a DDPM noise schedule"),
    ({"fuse_qkv_projections": "true"}, "HiDream's attention runs its own processor"),
    ({"text_encoder_4_precision": "bogus"}, "text_encoder_4_precision"),
])
def test_config_mistakes_for_hidream_are_named(project, overrides, message):
    assert message in error_of(project, **overrides)


def test_plan_memory_prints_a_plan_for_hidream(project, capsys):
    argv = HARNESS.plan_args(project, lora_rank=4)
    assert main(["plan-memory", *argv]) == 0
    out = capsys.readouterr().out
    assert "memory plan for hidream" in out and "transformer" in out and "training peak" in out
    assert "text_encoder_4" in out  # all four encoders are counted


# --- real runs -----------------------------------------------------------------------------------------


lora_run = HARNESS.lora_run_fixture(PROMPT)


slow = pytest.mark.slow


@slow
def test_lora_run_trains_saves_and_validates(lora_run):
    trainer, start, out = lora_run
    check_trained(trainer, start)
    assert trainer.model.denoiser.gradient_checkpointing  # --gradient_checkpointing reached the transformer
    keys, metadata = saved_lora_keys(out)
    pattern = (r"transformer\.(double|single)_stream_blocks\.\d+\.block\.attn1\.(to_[qkv]|to_out)(_t)?"
               r"\.lora_[AB]\.weight")
    assert keys and all(re.fullmatch(pattern, key) for key in keys), keys
    assert {key.split(".")[1] for key in keys} == {"double_stream_blocks", "single_stream_blocks"}
    assert any("to_q_t" in key for key in keys)  # the text stream of the dual-stream block too
    assert json.loads(metadata["lora_adapter_metadata"])["transformer.r"] == 16
    assert metadata["model_family"] == FAMILY and metadata["global_step"] == "3"
    check_validation_images(out)


@slow
def test_saved_lora_loads_in_diffusers_and_reproduces_training(project, lora_run):
    from diffusers import HiDreamImagePipeline

    trainer, _, out = lora_run
    pipeline = HiDreamImagePipeline.from_pretrained(project / "model")
    pipeline.set_progress_bar_config(disable=True)
    pipeline.default_sample_size = 8  # 64 px at 8 px per latent cell (the stock default is 1024 px)
    kwargs = dict(prompt=PROMPT, num_inference_steps=2, height=64, width=64, output_type="latent")
    with torch.no_grad():
        before = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
        pipeline.load_lora_weights(out)
        after = pipeline(generator=torch.Generator().manual_seed(0), **kwargs).images
        live = trainer.model.build_pipeline(trainer._unwrapped_denoiser().eval())
        live.set_progress_bar_config(disable=True)
        trained = live(generator=torch.Generator().manual_seed(0), **kwargs).images
    assert after.shape == (1, 16, 8, 8)
    assert (before - after).abs().max() > 1e-6, "loading the trained LoRA must change the output"
    torch.testing.assert_close(after, trained, rtol=0, atol=1e-5)


@slow
def test_comfyui_layout_names_transformer_paths_with_alphas(project, lora_run):
    """ComfyUI maps ``transformer.<native path>`` for HiDream (comfy/lora.py ``model_lora_keys_unet``, read
    through the code index on 2026-12-07), and HiDream's native names are diffusers' module paths."""
    from diffusers import HiDreamImageTransformer2DModel
    from safetensors import safe_open

    from simpletuner.models import lora_formats as formats

    assert formats.default_lora_format(FAMILY) == "diffusers"  # diffusers' loader reads no `.alpha` tensors
    trainer, start = run_cli(project, "comfy", lora_format="comfyui", lora_alpha=8)
    check_trained(trainer, start)
    with safe_open(str(project / "comfy" / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    modules = {key.rsplit(".", 2)[0] if key.endswith(".weight") else key.rsplit(".", 1)[0] for key in tensors}
    assert modules and all(f"{module}.alpha" in tensors and float(tensors[f"{module}.alpha"]) == 8.0
                           for module in modules)
    native = set(HiDreamImageTransformer2DModel.from_pretrained(project / "model", subfolder="transformer")
                 .state_dict())
    assert all(module.startswith("transformer.") and f"{module[len('transformer.'):]}.weight" in native
               for module in modules), modules
    with safe_open(str(project / "lora" / "pytorch_lora_weights.safetensors"), framework="pt") as handle:
        assert {key.rsplit(".", 2)[0] for key in handle.keys()} == modules


@slow
def test_full_run_with_load_balancing_saves_a_pipeline_diffusers_loads(project, lora_run):
    from diffusers import HiDreamImagePipeline

    from simpletuner.models.hidream import HiDream

    from simpletuner.training.trainer import Trainer

    calls, logged = [], []
    original, original_log = HiDream.encode_prompts, Trainer.optimization_step

    def step_and_record(self):
        loss, grad_norm, terms = original_log(self)
        logged.append(dict(terms))
        return loss, grad_norm, terms

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HiDream, "encode_prompts", lambda self, prompts: calls.append(prompts) or original(self, prompts))
        patch.setattr(Trainer, "optimization_step", step_and_record)
        # with gradient checkpointing: the routers' statistics come from inside recomputed blocks
        trainer, start = run_cli(project, "full", model_type="full", hidream_use_load_balancing_loss="true",
                                 hidream_load_balancing_loss_weight=0.5, gradient_checkpointing="true")
    assert calls == [], "the LoRA run cached every caption; a second run must not encode them again"
    check_trained(trainer, start)
    gate = "double_stream_blocks.0.block.ff_i.gate.weight"  # full training moves the routers too
    assert not torch.equal(dict(trainer._unwrapped_denoiser().named_parameters())[gate].detach(), start[gate])
    # its own logged term every step (``loss/load_balancing/loss``): weight 0.5 x three routers' balance
    assert len(logged) == 3 and all(terms["load_balancing/loss"] == pytest.approx(
        0.5 * 3 * terms["load_balancing/balance"], rel=1e-4) and terms["load_balancing/balance"] >= 0.9
        for terms in logged), logged
    saved = HiDreamImagePipeline.from_pretrained(project / "full" / "pipeline")
    base = HiDreamImagePipeline.from_pretrained(project / "model")
    assert saved.scheduler.config.shift == RELEASED_SHIFT and saved.text_encoder_4 is not None
    trained = trainer._unwrapped_denoiser().state_dict()
    loaded = saved.transformer.state_dict()
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[name], value) for name, value in trained.items())
    assert any(not torch.equal(base.transformer.state_dict()[name], value) for name, value in loaded.items())


#: preset -> (layer type, weight type) of a quantized transformer linear (the PEFT base layer)
QUANTIZED_LAYERS = {"int8-quanto": ("QLinear", "WeightQBytesTensor"), "int8-torchao": ("Linear", "Int8Tensor")}


@slow
@pytest.mark.parametrize("preset", list(QUANTIZED_LAYERS))
def test_lora_trains_on_a_quantized_transformer(project, lora_run, preset):
    # the Llama encoder (8B in the real model) quantized too, with its own text-encoder slot
    trainer, start = run_cli(project, f"quantized-{preset}", base_model_precision=preset,
                             text_encoder_4_precision=preset)
    check_trained(trainer, start)
    denoiser = trainer._unwrapped_denoiser()
    trainable = {name for name, p in denoiser.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    layer = denoiser.single_stream_blocks[0].block.attn1.to_q.base_layer
    assert (type(layer).__name__, type(layer.weight).__name__) == QUANTIZED_LAYERS[preset]
    assert trainer.model.quantization == {"transformer": f"{preset} (cpu)", "text_encoder_4": f"{preset} (cpu)"}
    llama_layer = trainer.model.text_encoder_4.model.layers[0].self_attn.q_proj
    assert type(llama_layer.weight).__name__ == QUANTIZED_LAYERS[preset][1]


@slow
def test_validation_previews_decode_with_a_tiny_autoencoder(project, lora_run, tmp_path):
    from simpletuner.testing.tiny_vision import make_tiny_autoencoder_tiny

    tae = make_tiny_autoencoder_tiny(tmp_path / "tae", latent_channels=16)
    run_cli(project, "preview", validation_prompt=PROMPT, validation_step_interval=3, validation_num_inference_steps=2,
            validation_preview="true", tiny_autoencoder_path=str(tae))
    previews = sorted(path.name for path in (project / "preview" / "validation" / "step_3" / "previews").iterdir())
    assert previews == ["64x64_00_step001.png", "64x64_00_step002.png"]
