"""What each offload option does, component by component.

Placement is checked by role ("compute" / "offload"): on this CPU-only machine both roles are the
CPU, so a test reads the record of moves the trainer would make on a GPU machine, and checks that
the results are unchanged. Disk offload and the unsloth saved-tensor hooks do real work on the CPU
too (files are written; activations are copied out and back).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from simpletuner.testing.config import make_config  # noqa: E402
from simpletuner.training import offload  # noqa: E402
from simpletuner.training.offload import MemorySavers, delete_hub_files  # noqa: E402


class StubFamily:
    """The parts of a ModelFamily the memory options touch, with small real modules."""

    denoiser_name = "unet"
    model_path = "/nonexistent/model"
    family = "stub"

    def __init__(self, vae=None, text_encoder=None):
        self.text_encoder = text_encoder or torch.nn.Linear(4, 4)
        self.text_encoder_2 = torch.nn.Linear(4, 4)
        self.vae = vae or torch.nn.Linear(4, 4)
        self.denoiser = torch.nn.Linear(4, 4)
        self.device = torch.device("cpu")
        self.calls: list[tuple[str, dict[str, str]]] = []
        self.savers: MemorySavers | None = None

    def text_encoder_modules(self):
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def trainable_text_encoders(self):
        return {"text_encoder": self.text_encoder}

    def _roles(self) -> dict[str, str]:
        roles = {}
        for component, role, _ in self.savers.placement.history:
            roles[component] = role
        return roles

    def encode_images(self, pixels):
        self.calls.append(("images", self._roles()))
        return {"latent_mean": pixels}

    def encode_prompts(self, prompts):
        self.calls.append(("prompts", self._roles()))
        return {"prompt_embeds": torch.zeros(len(prompts), 4)}


def test_offload_during_startup_parks_whatever_the_cache_step_does_not_use():
    model = StubFamily()
    savers = MemorySavers(make_config(offload_during_startup=True), torch.device("cpu"))
    model.savers = savers
    with savers.startup(model):
        model.encode_images(torch.zeros(1, 4))
        model.encode_images(torch.zeros(1, 4))
        model.encode_prompts(["a"])
    latent_phase, _, text_phase = (roles for _, roles in model.calls)
    assert latent_phase == {"text_encoder": "offload", "text_encoder_2": "offload", "vae": "compute"}
    assert text_phase == {"text_encoder": "compute", "text_encoder_2": "compute", "vae": "offload"}
    assert model._roles() == {"text_encoder": "compute", "text_encoder_2": "compute", "vae": "compute"}  # restored
    assert "encode_images" not in vars(model)  # the wrappers are gone again
    moves = [m for m in savers.placement.history if m[2] == "startup: latent caching"]
    assert len(moves) == 3  # two latent batches, one set of moves


def test_without_the_option_startup_moves_nothing():
    model = StubFamily()
    savers = MemorySavers(make_config(), torch.device("cpu"))
    model.savers = savers
    with savers.startup(model):
        model.encode_images(torch.zeros(1, 4))
    assert savers.placement.history == []


def test_offload_during_save_parks_what_is_written():
    model = StubFamily()
    savers = MemorySavers(make_config(offload_during_save=True), torch.device("cpu"))
    roles_during = {}
    with savers.saving(model, {"text_encoder": model.text_encoder}):
        roles_during.update({c: r for c, r, _ in savers.placement.history})
    assert roles_during == {"unet": "offload", "text_encoder": "offload"}
    assert {c: r for c, r, _ in savers.placement.history} == {"unet": "compute", "text_encoder": "compute"}
    quiet = MemorySavers(make_config(), torch.device("cpu"))
    with quiet.saving(model):
        pass
    assert quiet.placement.history == []


def test_model_cpu_offload_moves_frozen_components_only_while_they_run(tiny):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny.path("sd1x") / "vae")
    model = StubFamily(vae=vae)
    savers = MemorySavers(make_config(enable_model_cpu_offload=True, train_text_encoder=True), torch.device("cpu"))
    assert savers.load_device() == torch.device("cpu")
    savers.after_load(model)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    during = []
    vae.encoder.register_forward_hook(lambda *a: during.append(model.savers_roles()))
    model.savers_roles = lambda: {c: r for c, r, _ in savers.placement.history}
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mean
    assert during == [{"vae": "compute", "text_encoder_2": "offload"}]
    roles = {c: r for c, r, _ in savers.placement.history}
    assert roles == {"vae": "offload", "text_encoder_2": "offload"}  # text_encoder trains: left alone
    reference = AutoencoderKL.from_pretrained(tiny.path("sd1x") / "vae")
    with torch.no_grad():
        assert torch.equal(latents, reference.encode(pixels).latent_dist.mean)


def test_group_offload_writes_frozen_components_to_disk_and_keeps_outputs(tiny, tmp_path):
    from transformers import CLIPTextModel

    encoder = CLIPTextModel.from_pretrained(tiny.path("sd1x") / "text_encoder")
    reference = CLIPTextModel.from_pretrained(tiny.path("sd1x") / "text_encoder")
    model = StubFamily(text_encoder=encoder)
    savers = MemorySavers(make_config(enable_group_offload=True, group_offload_to_disk_path=str(tmp_path / "groups")),
                          torch.device("cpu"))
    savers.after_load(model)
    tokens = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        first = encoder(tokens)[0]
        second = encoder(tokens)[0]
        expected = reference(tokens)[0]
    assert torch.equal(first, expected) and torch.equal(second, expected)
    written = list((tmp_path / "groups" / "text_encoder").glob("*.safetensors"))
    assert written, "group offloading to disk wrote no file"
    assert any(reason.startswith("group offload (block_level, on disk") for _, _, reason in savers.placement.history)


def test_unsloth_backend_copies_checkpointed_inputs_out_and_back_with_unchanged_gradients(tiny):
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from tests.memory.test_block_swap import flux_inputs, train_step

    def lora_model():
        model = FluxTransformer2DModel.from_pretrained(tiny.path("flux") / "transformer")
        model.requires_grad_(False)
        torch.manual_seed(0)
        model.add_adapter(LoraConfig(r=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights="gaussian"))
        model.enable_gradient_checkpointing()
        return model

    reference_loss, reference_grads = train_step(lora_model())
    model = lora_model()
    hooks = offload.offload_checkpointed_inputs(model, force_copy=True)
    originals = []
    original_pack = hooks.pack
    hooks.pack = lambda tensor: (originals.append(tensor.untyped_storage().data_ptr()), original_pack(tensor))[1]
    loss, grads = train_step(model)
    assert loss == reference_loss
    assert all(torch.equal(grads[name], reference_grads[name]) for name in reference_grads)
    # the inputs of each of the 4 checkpointed blocks went out (hidden states, text stream, temb, ...)
    assert hooks.packed_count >= 4
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert not weights & set(originals[: hooks.packed_count])  # weights are never copied out
    assert flux_inputs  # (imported for train_step's inputs)


def test_vae_slicing_and_tiling_change_how_the_vae_is_called(tiny, memory_config):
    from diffusers import AutoencoderKL

    from simpletuner.models.sd1x import StableDiffusion1x

    vae = AutoencoderKL.from_pretrained(tiny.path("sd1x") / "vae")
    calls = []
    vae.encoder.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    model = StubFamily(vae=vae)
    MemorySavers(make_config(vae_enable_slicing=True), torch.device("cpu")).after_load(model)
    with torch.no_grad():
        vae.encode(torch.zeros(2, 3, 64, 64))
    assert calls == [(1, 3, 64, 64), (1, 3, 64, 64)]  # one image at a time
    vae.use_slicing = False
    calls.clear()
    MemorySavers(make_config(vae_enable_tiling=True), torch.device("cpu")).after_load(model)
    with torch.no_grad():
        vae.encode(torch.zeros(1, 3, 128, 128))
    assert len(calls) > 1 and all(shape[-1] <= 64 for shape in calls)  # tiles of at most 64 px
    # tiling changes latents (blended seams), so the latent cache is keyed on it; slicing does not
    plain = StableDiffusion1x(memory_config("sd1x"), torch.device("cpu"), torch.float32).latent_fingerprint_parts()
    tiled = StableDiffusion1x(memory_config("sd1x", vae_enable_tiling="true"), torch.device("cpu"),
                              torch.float32).latent_fingerprint_parts()
    sliced = StableDiffusion1x(memory_config("sd1x", vae_enable_slicing="true"), torch.device("cpu"),
                               torch.float32).latent_fingerprint_parts()
    assert tiled != plain and sliced == plain


# --- --delete_model_after_load -----------------------------------------------------------------------


def fake_hub_cache(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """A Hugging Face cache holding ``repo_id`` the way huggingface_hub lays it out (blobs + snapshot links)."""
    import hashlib

    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for relative, content in files.items():
        digest = hashlib.sha256(content).hexdigest()
        blob = repo / "blobs" / digest
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = repo / "snapshots" / commit / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return repo / "snapshots" / commit


FILES = {"unet/diffusion_pytorch_model.safetensors": b"unet", "unet/config.json": b"{}",
         "vae/diffusion_pytorch_model.safetensors": b"vae", "text_encoder/model.safetensors": b"te",
         "model_index.json": b"{}"}


def test_delete_hub_files_removes_only_the_named_components(tmp_path):
    snapshot = fake_hub_cache(tmp_path / "hub", "org/tiny", FILES)
    deleted = delete_hub_files("org/tiny", ["unet"], cache_dir=str(tmp_path / "hub"))
    assert sorted(deleted) == ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    assert not (snapshot / "unet" / "config.json").exists()
    assert (snapshot / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == b"vae"
    assert (snapshot / "model_index.json").exists()
    blobs = {p.read_bytes() for p in (tmp_path / "hub" / "models--org--tiny" / "blobs").iterdir()}
    assert blobs == {b"vae", b"te", b"{}"}  # model_index.json's blob is shared with unet/config.json's


def test_delete_hub_files_never_touches_a_local_folder_or_an_uncached_repo(tmp_path):
    folder = tmp_path / "my-model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "weights.safetensors").write_bytes(b"mine")
    assert delete_hub_files(str(folder), ["unet"]) == []
    assert (folder / "unet" / "weights.safetensors").exists()
    assert delete_hub_files("org/not-cached", ["unet"], cache_dir=str(tmp_path / "empty")) == []


def test_only_local_rank_zero_deletes_and_the_vae_stays_for_validation(tmp_path, monkeypatch):
    fake_hub_cache(tmp_path / "hub", "org/tiny", FILES)
    calls = []
    monkeypatch.setattr(offload, "delete_hub_files", lambda repo, folders, cache_dir=None: calls.append((repo, folders)))
    model = StubFamily()
    model.model_path = "org/tiny"
    MemorySavers(make_config(delete_model_after_load=True), torch.device("cpu"), local_rank=1).after_load(model)
    assert calls == []
    MemorySavers(make_config(delete_model_after_load=True), torch.device("cpu"), local_rank=0).after_load(model)
    assert calls == [("org/tiny", ["unet"])]  # validation is on: the VAE is kept
    calls.clear()
    savers = MemorySavers(make_config(delete_model_after_load=True, validation_disable=True), torch.device("cpu"))
    savers.after_load(model)
    with savers.startup(model):
        pass
    assert calls == [("org/tiny", ["unet", "vae"]), ("org/tiny", ["text_encoder", "text_encoder_2"])]


def test_memory_budget_at_start_up_warns_with_a_proposal(memory_config, caplog):
    model = StubFamily()
    config = memory_config("flux", resolution=128, image_size=128, train_batch_size=4, memory_budget="8MiB")
    with caplog.at_level("WARNING", logger="simpletuner.training.offload"):
        MemorySavers(config, torch.device("cpu")).after_load(model)
    assert "above --memory_budget 8.00 MiB; to fit: --" in caplog.text
    roomy = MemorySavers(config.replace(memory_budget="1GiB"), torch.device("cpu"))
    roomy.after_load(model)
    assert "within --memory_budget 1.00 GiB" in roomy.describe()


def test_memory_budget_under_fsdp_is_checked_per_rank(memory_config, caplog):
    """With FSDP2 over 4 processes each rank holds a quarter of the weights and optimizer state, so the
    check compares the per-rank peak, which is below the single-process one."""
    from simpletuner.memory import planner
    from simpletuner.memory.sharding import plan_sharding

    model = StubFamily()
    config = memory_config("flux", resolution=128, image_size=128, train_batch_size=4, memory_budget="1GiB",
                           fsdp_enable=True, num_processes=4)
    estimate = planner.estimate(planner.read_inventory(config), planner.PlanSettings.from_config(config))
    per_rank = plan_sharding(estimate, planner.read_inventory(config), config).training_peak
    assert per_rank < estimate.peak
    savers = MemorySavers(config, torch.device("cpu"))
    savers.after_load(model)
    assert "estimated peak per rank" in savers.describe() and "within --memory_budget 1.00 GiB" in savers.describe()
