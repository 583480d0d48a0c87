"""The training run, top to bottom: setup, fit, save.

Features plug in as objects (the model family, the method computing the loss, EMA, the validator,
the tracker) so the loop itself stays short. accelerate owns devices, mixed precision, gradient
accumulation and the distributed plumbing.
"""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from statistics import median

import torch

from simpletuner.training import checkpoint as ckpt
from simpletuner.training import distributed
from simpletuner.training import sequence_parallel
from simpletuner.training.checkpoint_schedule import ROLLING, CheckpointSchedule
from simpletuner.training.deepspeed import uses_deepspeed
from simpletuner.training.memory import clear_accelerator_cache
from simpletuner.training.nan_guard import NanGuard, first_nonfinite, loss_spike
from simpletuner.training.optim import clip_gradients, optimizer_mode, set_optimizer_mode
from simpletuner.training.output_folder import RUN_CONFIG_KEY, run_identity
from simpletuner.training.precision import (Fp32GradientAccumulator, apply_model_precision, configure_tf32,
                                            enable_fp16_loss_scaling, weight_dtype_for)
from simpletuner.training.progress import bar_paused, training_progress_bar

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
FULL_WEIGHTS_FILE = "denoiser.safetensors"


@dataclass
class LoopState:
    """Counters with units in their names; saved in every checkpoint."""

    global_step: int = 0
    micro_step: int = 0
    num_images_seen: int = 0
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)


class Trainer:
    """One training run. ``setup()`` builds everything, ``fit()`` trains, ``save_final()`` writes outputs."""

    def __init__(self, config, launcher=None, config_file: Path | None = None, show_progress: bool = True,
                 dataset_plan=None, notes: list[str] | tuple[str, ...] = ()):
        self.config = config
        self.launcher = launcher
        self.config_file = config_file
        self.dataset_plan = dataset_plan  # checked at start-up (ResolvedRun); read in setup() when not given
        self.notes = list(notes)  # decisions taken before the run (training/preflight.py), for the summary
        self.show_progress = show_progress
        self.output_dir = Path(config.output_dir)
        self.state = LoopState()
        self._last_step_end: float | None = None
        self.text_encoders = None  # TextEncoderTraining with --train_text_encoder
        self.grad_accumulator: Fp32GradientAccumulator | None = None
        self.method_parameters: list[torch.nn.Parameter] = []  # modules a method or regularizer brings
        from simpletuner.tracking.webhooks import NullNotifier

        self.webhooks = NullNotifier()  # --webhook_config, built in setup() once the main process is known
        self.batch_inspector = None  # --debug_dataset_loader / --print_sampler_statistics
        self.nan_guard = NanGuard.from_config(config)  # --nan_action (training/nan_guard.py)

    # --- setup ---------------------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        from simpletuner.tracking.trackers import accelerator_tracking_arguments
        from simpletuner.training import fsdp, zero

        config = self.config
        if config.torch_num_threads:
            torch.set_num_threads(config.torch_num_threads)
        configure_tf32(bool(config.disable_tf32))
        sharding = fsdp.fsdp_plugin(config)  # --fsdp_enable: FSDP2 through accelerate (training/fsdp.py)
        self.accelerator = Accelerator(
            mixed_precision=config.mixed_precision,
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            dynamo_backend="no",  # the denoiser is compiled in place below (distributed.compile_denoiser)
            **zero.accelerator_arguments(config),  # --zero_stage / --deepspeed_config (training/zero.py)
            fsdp_plugin=sharding, parallelism_config=fsdp.accelerator_mesh(config),  # --hsdp_*_dim (GPUs)
            **accelerator_tracking_arguments(config, self.output_dir),  # --report_to: accelerate's trackers
        )
        enable_fp16_loss_scaling(self.accelerator)  # fp16 on CPU: autocast + GradScaler (training/precision.py)
        fsdp.mark_fsdp_on_cpu(self.accelerator, sharding, config)  # with HSDP's mesh on CPU processes
        fsdp.check_started(self.accelerator, sharding)
        distributed.check_engine(self.accelerator, zero_from_options=uses_deepspeed(config))
        zero.load_models_whole(self.accelerator)  # ZeRO-3 splits the denoiser only, when it is prepared
        self.is_main = self.accelerator.is_main_process
        from simpletuner.tracking.webhooks import build_notifier

        self.webhooks = build_notifier(config, self.is_main)
        if config.seed is not None:
            # --seed_for_each_device: rank r uses seed + r (different noise per process, still reproducible)
            set_seed(config.seed, device_specific=bool(config.seed_for_each_device))
        self.batch_seed_base = distributed.seed_base(config.seed)  # each batch's noise: (base, global index)
        # --sp_size: groups of processes share a batch; the data is sharded by group (training/sequence_parallel.py)
        self.data_ranks = sequence_parallel.data_ranks(self.accelerator.num_processes, self.accelerator.process_index,
                                                       config.sp_size)
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.remove_stale_temp_folders(self.output_dir)
            self._write_resolved_config()
        from simpletuner.training.offload import MemorySavers

        if self.dataset_plan is None:
            from simpletuner.data.config import load_dataset_plan

            self.dataset_plan = load_dataset_plan(config.data_backend_config)
        self.memory = MemorySavers(config, self.accelerator.device, self.accelerator.local_process_index,
                                   dataset_plan=self.dataset_plan)
        self.model = self._load_model()
        self.data = self._build_data()
        self._build_data_debugging()
        self.trainable = self._prepare_trainable()
        self.memory.before_optimization(self.model)  # unsloth checkpointing, block swap, RamTorch (training/offload.py)
        sequence_parallel.enable_sequence_parallel(self.model.denoiser, config.sp_size, self.accelerator.device)
        distributed.compile_denoiser(self.model.denoiser, getattr(self.launcher, "dynamo_backend", None), config)
        self._build_optimization()
        self._build_observers()
        self._build_checkpointing()
        self._maybe_resume()
        if self.is_main:
            logger.info("\n%s", self.startup_summary())
            self._notify_started()

    @property
    def weight_dtype(self) -> torch.dtype:
        return weight_dtype_for(self.config)  # fp16: LoRA bases in fp16, full training in fp32

    def _write_resolved_config(self) -> None:
        """training_config.json: every resolved option, secrets redacted (options/secrets.py), owner-only."""
        from simpletuner.options.secrets import redacted_config, write_private_json

        resolved = {"config_file": str(self.config_file) if self.config_file else None, **self.config.as_dict()}
        write_private_json(self.output_dir / "training_config.json", redacted_config(resolved))

    def _load_model(self):
        from simpletuner.models.registry import load_family_class

        family_class = load_family_class(self.config.model_family)
        model = family_class(self.config, self.memory.load_device(), self.weight_dtype)
        logger.info("loading %s from %s", self.config.model_family, model.model_path)
        from simpletuner.models.quantize import load_model
        from simpletuner.training.fsdp import loads_weights

        # model.load(), with quantized components (models/quantize.py); --fsdp_cpu_ram_efficient_loading: the
        # processes other than the main one build the denoiser without weights
        load_model(model, self.config, denoiser_without_weights=not loads_weights(self.config, self.is_main))
        self.memory.after_load(model)  # placement, VAE slicing/tiling, component offload, hub file deletion
        apply_model_precision(model, self.config, self.accelerator.device)  # --vae_dtype, --attention_mechanism
        self.attention_note = None
        if self.config.fuse_qkv_projections:  # fused right after loading (models/qkv_fusion.py)
            from simpletuner.models.qkv_fusion import select_attention

            self.attention_note = "fused q/k/v projections, " + select_attention(model.denoiser, self.accelerator.device)
        return model

    def _build_data(self):
        """Datasets with their caches: latents, text embeds, and the per-image features the enabled
        regularizers read from the batch (regularizers/registry.py ``cached_features``)."""
        from simpletuner.data.dataset import build_training_data
        from simpletuner.regularizers.registry import cached_features

        with self.accelerator.main_process_first(), self.memory.startup(self.model):  # --offload_during_startup
            return build_training_data(self.config, self.model, self.dataset_plan,
                                       show_progress=self.show_progress and self.is_main,
                                       num_processes=self.data_ranks.size, rank=self.data_ranks.rank,
                                       feature_encoders=cached_features(self.model, self.config))

    def _build_data_debugging(self) -> None:
        """--debug_aspect_buckets (once, now), --debug_dataset_loader and --print_sampler_statistics (per batch)."""
        from simpletuner.data.debug import BatchInspector, log_aspect_buckets

        config = self.config
        if config.debug_aspect_buckets and self.is_main:
            log_aspect_buckets(self.data)
        inspector = BatchInspector(self.data, bool(config.debug_dataset_loader), bool(config.print_sampler_statistics))
        self.batch_inspector = inspector if inspector.active else None

    def _notify_started(self) -> None:
        config = self.config
        self.webhooks.send(
            "run_started",
            f"training started: {config.model_family} {config.model_type}, {self.max_steps} steps",
            model_family=config.model_family, model_flavour=config.model_flavour, model_type=config.model_type,
            model=str(self.model.model_path), max_steps=self.max_steps, steps_per_epoch=self.steps_per_epoch,
            start_step=self.state.global_step,
            batch_size=config.train_batch_size * config.gradient_accumulation_steps * self.data_ranks.size,
            learning_rate=config.learning_rate, output_dir=str(self.output_dir),
        )

    def _prepare_trainable(self) -> list[torch.nn.Parameter]:
        from simpletuner.training.adapter import attach_adapter
        from simpletuner.training.freezing import apply_bitfit

        config = self.config
        denoiser = self.model.denoiser
        if config.controlnet:  # the ControlNet trains (methods/controlnet.py); the denoiser stays frozen
            self.lora_config = self.adapter = None
            denoiser.requires_grad_(False)
        elif config.model_type == "lora":
            # PEFT or LyCORIS, targets, init, --init_lora: simpletuner/training/adapter.py
            self.adapter = attach_adapter(self.model, config, current_step=lambda: self.state.global_step)
            self.lora_config = self.adapter.lora_config
        else:
            self.lora_config = self.adapter = None
            denoiser.requires_grad_(True)
            if config.layer_freeze_strategy == "bitfit":
                logger.info("bitfit: %d bias parameters train, every other weight is frozen", apply_bitfit(denoiser))
        if config.gradient_checkpointing:
            blocks = self.model.enable_gradient_checkpointing(config.gradient_checkpointing_interval)
            logger.info("gradient checkpointing in %d blocks", blocks)
        denoiser.train()
        self.denoiser_parameters = [p for p in denoiser.parameters() if p.requires_grad]
        if config.train_text_encoder:
            from simpletuner.training.text_encoder import TextEncoderTraining

            self.text_encoders = TextEncoderTraining(self.model, config)
            return self.denoiser_parameters + self.text_encoders.prepare()
        return list(self.denoiser_parameters)

    def _build_method(self) -> list[torch.nn.Parameter]:
        """The ``--training_method`` (simpletuner/methods/registry.py) and the regularizers the config
        switches on (simpletuner/regularizers/registry.py), hooked into the model; returns the trainable
        parameters of the modules they bring besides the model (none for SFT), which join the optimizer."""
        from simpletuner.methods.base import MethodContext
        from simpletuner.methods.registry import build_method, method_of
        from simpletuner.methods.prior_preservation import with_prior_preservation
        from simpletuner.regularizers.base import Regularizers
        from simpletuner.regularizers.registry import build_regularizers

        self.method = build_method(method_of(self.config), self.model, self.config)
        # regularisation datasets: weighted by --prior_loss_weight, optionally against the base model
        self.method = with_prior_preservation(self.method, self.model, self.config, self.dataset_plan)
        self.method.encode_text_live = self.text_encoders is not None
        self.regularizers = Regularizers(build_regularizers(self.model, self.config), self.model,
                                         process_mean=partial(distributed.mean_over_processes, self.accelerator))
        modules = {**self.method.trainable_modules(),
                   **{f"{r.name}.{n}": m for r in self.regularizers.items for n, m in r.trainable_modules().items()}}
        parameters = []
        for module in modules.values():
            module.to(self.accelerator.device).train()
            parameters += [p for p in module.parameters() if p.requires_grad]
        # outside DDP: same start on every process, gradients averaged in optimization_step
        distributed.broadcast_parameters(self.accelerator, parameters)
        self.method_parameters = parameters
        if hasattr(self.method, "bind"):  # a method with optimizers of its own (distillation's critic)
            self.method.bind(MethodContext(partial(distributed.average_gradients, self.accelerator)))
        return parameters

    def _build_optimization(self) -> None:
        from simpletuner.training import shard_census
        from simpletuner.training.ema import EmaSettings, EmaWeights
        from simpletuner.training.lr import build_lr_scheduler
        from simpletuner.training.optim import build_optimizer

        config = self.config
        batches_per_process = self.data.sampler.batches_per_epoch() // self.data_ranks.size
        self.steps_per_epoch = max(1, batches_per_process // config.gradient_accumulation_steps)
        self.max_steps = planned_max_steps(config, self.steps_per_epoch)
        method_parameters = self._build_method()
        extra_groups = []
        if self.text_encoders is not None:
            extra_groups.append((self.text_encoders.parameters(), self.text_encoders.learning_rate()))
        if method_parameters:
            extra_groups.append((method_parameters, config.learning_rate))
        optimizer = build_optimizer(config, self.denoiser_parameters, num_processes=self.data_ranks.size,
                                    extra_groups=extra_groups)
        self.learning_rate = float(optimizer.param_groups[0]["lr"])  # after --lr_scale, which only build_optimizer applies
        # The LR schedule is stepped once per optimizer step, on every process, so it is not prepared.
        self.lr_scheduler = build_lr_scheduler(config, optimizer, self.max_steps)
        self._before_sharding()
        self.model.denoiser, self.optimizer = self.accelerator.prepare(self.model.denoiser, optimizer)
        self._after_sharding()
        self.zero = self._zero_checkpoints(method_parameters)
        if self.text_encoders is not None and self.accelerator.num_processes > 1:
            for name, encoder in self.text_encoders.encoders.items():  # DDP keeps their gradients in sync
                setattr(self.model, name, self.accelerator.prepare(encoder))
        if config.gradient_precision == "fp32":
            self.grad_accumulator = Fp32GradientAccumulator(self.trainable)
            if not self.grad_accumulator.active:
                logger.info("--gradient_precision fp32: the trained weights are fp32 already, nothing to do")
        self.ema = EmaWeights(self.trainable, settings=EmaSettings.from_config(config)) if config.use_ema else None
        self.trainable = self.trainable + method_parameters  # clipped and checked like the model's; not averaged
        shard_census.install_if_requested(self)  # SIMPLETUNER_MEASURE_SHARDS: benchmarks/sharded_memory.py

    def _before_sharding(self) -> None:
        """FSDP2: pick the block classes to shard, and load a resumed checkpoint's weights while the
        denoiser is still whole (the optimizer state follows in ``_maybe_resume``)."""
        from simpletuner.training import fsdp

        self.sharded = None
        if not fsdp.is_fsdp(self.accelerator):
            return
        fsdp.set_block_classes(self.accelerator, self.model.denoiser)
        folder = ckpt.resolve_resume_path(self.output_dir, self.config.resume_from_checkpoint)
        if folder is None or (folder / fsdp.SHARDED_FOLDER).is_dir():  # shards load after sharding
            return
        if fsdp.loads_weights(self.config, self.is_main):  # else: the main process's weights are sent when sharding
            self._load_checkpoint_weights(folder)

    def _after_sharding(self) -> None:
        """FSDP2 replaced every parameter of the denoiser by its slice: track the new ones."""
        from simpletuner.training import fsdp

        if not fsdp.is_fsdp(self.accelerator):
            return
        self.denoiser_parameters = fsdp.trained_parameters(self.model.denoiser)
        self.trainable = list(self.denoiser_parameters)
        self.sharded = fsdp.ShardedSaving(self.model.denoiser, self.optimizer, self.is_main,
                                          shards=fsdp.writes_shards(self.config),
                                          wait_for_everyone=self.accelerator.wait_for_everyone)

    def _zero_checkpoints(self, method_parameters: list):
        """DeepSpeed ZeRO: its engine writes and reads the split optimizer state (training/zero.py)."""
        from simpletuner.training import zero

        if not zero.is_deepspeed(self.accelerator):
            return None
        zero.check_outside_parameters(self.accelerator, method_parameters)
        return zero.ZeroCheckpoints(self.model.denoiser, self.is_main, self.accelerator.wait_for_everyone,
                                    lora=self.config.model_type == "lora",
                                    stage=self.accelerator.state.deepspeed_plugin.zero_stage)

    def _gathered_for_saving(self, with_optimizer: bool):
        """FSDP2: every process gathers the full weights (and optimizer state) so the main process writes
        the same files as one process would; ZeRO-3 gathers the weights; otherwise nothing to do."""
        if getattr(self, "zero", None) is not None:
            return self.zero.gathered()
        if getattr(self, "sharded", None) is None:
            return contextlib.nullcontext()
        return self.sharded.gathered(with_optimizer)

    def _prepared_for_checkpoint(self):
        """FSDP2: every process gathers, or writes its shards (--fsdp_state_dict_type sharded), before the
        main process writes the checkpoint; ZeRO: every process writes its share of the optimizer state;
        otherwise nothing to do."""
        if getattr(self, "zero", None) is not None:
            return self.zero.for_checkpoint(self.output_dir, self.state.global_step)
        if getattr(self, "sharded", None) is None:
            return contextlib.nullcontext()
        return self.sharded.for_checkpoint(self.output_dir, self.state.global_step)

    def _build_observers(self) -> None:
        from simpletuner.tracking import build_tracker
        from simpletuner.validation.runner import ValidationSettings, Validator

        config = self.config
        self.tracker = build_tracker(self.accelerator, config, self.output_dir, self.is_main, self.config_file)
        edge = max(max(size) for size in self.data.sampler.bucket_sizes)
        self.validator = Validator(
            settings=ValidationSettings.from_config(config, fallback_edge=edge,  # a distilled student's own sampling
                                                    family_defaults={**self.model.validation_defaults(),
                                                                     **self._method_validation_defaults()}),
            output_dir=self.output_dir, tracker=self.tracker,
            interval=None if config.validation_disable else config.validation_step_interval,
            benchmark_enabled=not config.disable_benchmark and not config.validation_disable,
            device=self.accelerator.device,
            disabled=config.validation_disable,
            epoch_interval_steps=(config.validation_epoch_interval * self.steps_per_epoch
                                  if config.validation_epoch_interval and not config.validation_disable else None),
            on_startup=bool(config.validation_on_startup),
        )
        if config.controlnet or config.control:  # the first control image, for validation (validation/controlnet.py)
            from simpletuner.validation.controlnet import attach_validation_image

            attach_validation_image(self.model, self.data)
        from simpletuner.training.clip_eval import ClipEvaluation
        from simpletuner.training.evaluation import EvalLoss, EvalSchedule

        # --eval_*: the loss on held-out eval datasets (training/evaluation.py)
        self.eval_loss = EvalLoss.from_config(config, self.method, self.data, self.accelerator)
        # --evaluation_type clip: a CLIP score of images sampled from the validation prompts (clip_eval.py)
        self.clip_eval = ClipEvaluation.from_config(config, self.validator.settings, self.accelerator.device)
        self.eval_schedule = EvalSchedule(config.eval_steps_interval, config.eval_epoch_interval, self.steps_per_epoch)

    def _method_validation_defaults(self) -> dict:
        """A method's sampling defaults (a few-step student: its step count, guidance 1, its scheduler)."""
        defaults = getattr(self.method, "validation_defaults", None)
        return defaults() if defaults is not None else {}

    def _build_checkpointing(self) -> None:
        """When checkpoints are due (needs ``steps_per_epoch``), and the free-space check and user script
        around each save; the last two only act on the main process, which writes the checkpoints."""
        from simpletuner.training.checkpoint_hooks import DiskGuard, PostCheckpointScripts

        self.checkpoint_schedule = CheckpointSchedule.from_config(self.config, self.steps_per_epoch)
        self.disk_guard = DiskGuard.from_config(self.config, self.output_dir) if self.is_main else None
        self.post_checkpoint = PostCheckpointScripts.from_config(self.config) if self.is_main else None
        from simpletuner.publishing.hub import HubPublisher

        self.hub = HubPublisher.from_config(self.config) if self.is_main else None  # --push_to_hub
        self._register_state_parts()

    def _register_state_parts(self) -> None:
        """Every component's resumable state, one checkpoint file each (training/state_parts.py); the
        RNGs come last, so nothing draws a random number after they are restored."""
        from simpletuner.training.state_parts import StatePart, StateParts

        parts = self.state_parts = StateParts()
        if getattr(self, "zero", None) is not None:
            pass  # ZeRO: the split optimizer state is in DeepSpeed's own files (training/zero.py)
        elif getattr(self, "sharded", None) is None:
            parts.register(StatePart("optimizer.pt", self.optimizer.state_dict, self._restore_optimizer))
        elif not self.sharded.shards:  # FSDP2: the gathered state, keyed by parameter names
            parts.register(StatePart("optimizer.pt", self.sharded.optimizer_state, self.sharded.restore_optimizer))
        # (FSDP2 with --fsdp_state_dict_type sharded: the optimizer state is in the DCP shards, fsdp.py)
        parts.register(StatePart("lr_scheduler.pt", self.lr_scheduler.state_dict, self.lr_scheduler.load_state_dict))
        if self.ema is not None:  # a checkpoint from a run without EMA: the average starts from the weights
            parts.register(StatePart("ema.pt", self.ema.state_dict, self.ema.load_state_dict, optional=True))
        parts.register(StatePart("method.pt", self.method.state_dict, self.method.load_state_dict, skip_when_empty=True))
        for regularizer in self.regularizers.items:  # projectors, schedule state (similarity EMA, cutoff)
            parts.register(StatePart(f"regularizer-{regularizer.name}.pt", regularizer.state_dict,
                                     regularizer.load_state_dict, skip_when_empty=True))
        if self.accelerator.scaler is not None:  # --mixed_precision fp16: the loss scale and its growth counter
            parts.register(StatePart("grad_scaler.pt", self.accelerator.scaler.state_dict,
                                     self.accelerator.scaler.load_state_dict))
        parts.register(StatePart("sampler.json", self.data.state_dict, self.data.load_state_dict))
        parts.register(StatePart("random_states.pt", ckpt.rng_state, ckpt.restore_rng_state))

    def _restore_optimizer(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
        set_optimizer_mode(self.optimizer, "train")  # schedule-free optimizers are saved in eval mode

    # --- checkpoints ---------------------------------------------------------------------------------

    def _unwrapped_denoiser(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model.denoiser)

    def save_checkpoint(self, rolling: bool = False) -> Path | None:
        """Write ``checkpoint-<step>`` (``rolling`` marks one from ``--checkpointing_rolling_steps``), prune
        each kind to its own limit, then start ``--post_checkpoint_script``. The free-space check runs
        first, so a run stopped for lack of space has written nothing."""
        with self._prepared_for_checkpoint():  # FSDP2: every process takes part
            if not self.is_main:
                return None
            return self._write_checkpoint(rolling)

    def _write_checkpoint(self, rolling: bool) -> Path | None:
        step = self.state.global_step
        self._refuse_nonfinite_weights(step)
        if self.disk_guard is not None:
            self.disk_guard.ensure_space(step)
        staging = Path(tempfile.gettempdir()) if self.config.checkpointing_use_tempdir else None
        state = {**self._checkpoint_state(rolling), **self._suspect_mark(step)}
        with self.memory.saving(self.model, getattr(self.text_encoders, "encoders", None)):  # --offload_during_save
            folder = ckpt.write_checkpoint(self.output_dir, step, self._checkpoint_writers(), state,
                                           staging_root=staging)
        logger.info("saved %scheckpoint %s", "rolling " if rolling else "", folder)
        if folder is not None:
            self.webhooks.send("checkpoint", f"saved {'rolling ' if rolling else ''}checkpoint {Path(folder).name}",
                               step=step, path=str(folder), rolling=rolling)
        ckpt.prune_checkpoints(self.output_dir, self.config.checkpoints_total_limit)
        ckpt.prune_checkpoints(self.output_dir, self.config.checkpoints_rolling_total_limit, rolling=True)
        if self.post_checkpoint is not None:
            self.post_checkpoint.launch(folder, step)
        if self.hub is not None:
            self.hub.push_checkpoint(folder, step)  # --push_checkpoints_to_hub
        return folder

    def _refuse_nonfinite_weights(self, step: int) -> None:
        """No checkpoint is ever written from weights holding NaN or inf: resuming it could only fail."""
        from simpletuner.training.fsdp import local_tensors

        found = first_nonfinite(local_tensors(self.trainable))  # FSDP2: this process's slices
        if found is None:
            return
        index, count = found
        names = {id(p): n for n, p in self._unwrapped_denoiser().named_parameters()}
        name = names.get(id(self.trainable[index]), f"trained tensor #{index}")
        raise ckpt.CheckpointError(
            f"refusing to write checkpoint-{step}: {count} of the {len(self.trainable)} trained tensors hold NaN or "
            f"inf values (the first is {name}). {ckpt.newest_checkpoint_note(self.output_dir)}. Lower --learning_rate or "
            "set --max_grad_norm before resuming")

    def _suspect_mark(self, step: int) -> dict:
        """``"suspect": true`` for a checkpoint saved during a loss spike (nan_guard.loss_spike), which
        ``--resume_from_checkpoint latest`` then passes over."""
        reason = loss_spike(self.state.losses)
        if reason is None:
            return {}
        logger.warning("checkpoint-%d is marked suspect: %s; --resume_from_checkpoint latest will skip it", step,
                       reason)
        return {"suspect": True, "suspect_reason": reason}

    def _checkpoint_writers(self) -> dict:
        """File name -> function writing it: everything an exact resume needs."""
        from safetensors.torch import save_model

        writers = self.state_parts.writers()  # optimizer, schedule, EMA, method, sampler, RNGs
        if getattr(self, "zero", None) is not None:  # ZeRO's split optimizer state, staged by every process
            writers.update(self.zero.writers(self.output_dir, self.state.global_step))
        if getattr(self, "sharded", None) is not None and self.sharded.shards:  # weights + optimizer: DCP shards
            return {**writers, **self.sharded.shard_writers(self.output_dir, self.state.global_step)}
        if self.config.controlnet:  # the ControlNet's weights are the method's state; the denoiser is frozen
            return writers
        if self.config.model_type == "lora":
            writers[WEIGHTS_FILE] = lambda path: self._save_lora(path.parent)
        else:
            writers[FULL_WEIGHTS_FILE] = lambda path: save_model(self._unwrapped_denoiser(), str(path))
            if self.text_encoders is not None:
                writers.update(self.text_encoders.full_state_files())
        return writers

    def _checkpoint_state(self, rolling: bool) -> dict:
        """training_state.json: the counters, what must match on resume, and the checkpoint's kind
        (read back by pruning, so each limit still only counts its own kind after a restart)."""
        return {"global_step": self.state.global_step, "micro_step": self.state.micro_step,
                "num_images_seen": self.state.num_images_seen, "max_steps": self.max_steps,
                "model_type": self.config.model_type, "model_family": self.config.model_family,
                "fuse_qkv_projections": bool(self.config.fuse_qkv_projections), "rolling": rolling,
                RUN_CONFIG_KEY: run_identity(self.config),  # what a later start compares (output_folder.py)
                # data-parallel groups: with --sp_size the processes of a group share each batch
                **distributed.topology(self.config, self.data_ranks.size)}

    def wait_for_post_checkpoint_scripts(self) -> None:
        """The end of a run waits for ``--post_checkpoint_script`` runs still going, so none is orphaned."""
        if getattr(self, "post_checkpoint", None) is not None:
            self.post_checkpoint.wait()
        if getattr(self, "hub", None) is not None:
            self.hub.close()  # --push_to_hub_background: pending uploads finish before the run ends

    def _maybe_resume(self) -> None:
        folder = ckpt.resolve_resume_path(self.output_dir, self.config.resume_from_checkpoint)
        if folder is None:
            if self.config.resume_from_checkpoint == "latest":
                logger.info("no checkpoint in %s yet: starting from step 0", self.output_dir)
            return
        state = ckpt.read_training_state(folder)
        if state.get("model_type") != self.config.model_type:
            raise ckpt.CheckpointError(
                f"{folder} was saved by a --model_type {state.get('model_type')} run; this run uses "
                f"--model_type {self.config.model_type}. Use a matching checkpoint or a new --output_dir"
            )
        from simpletuner.training import fsdp, zero

        fsdp.check_sharded_resume(folder, state, fsdp.writes_shards(self.config), self.accelerator.num_processes)
        zero.check_resume(folder, state, getattr(self, "zero", None) is not None, self.accelerator.num_processes)
        distributed.check_resume_topology(folder, state, self.config, self.data_ranks.size)
        fused = bool(state.get("fuse_qkv_projections", False))
        if self.config.model_type == "full" and fused != bool(self.config.fuse_qkv_projections):
            raise ckpt.CheckpointError(
                f"{folder} holds weights {'with' if fused else 'without'} fused q/k/v projections; set "
                f"`--fuse_qkv_projections {str(fused).lower()}` to resume it (LoRA checkpoints work either way)")
        zero_state = getattr(self, "zero", None)
        if zero_state is not None and zero_state.splits_weights:
            pass  # ZeRO-3: each process's weight slice comes from DeepSpeed's files (below)
        elif getattr(self, "sharded", None) is None:  # FSDP2 loaded them before sharding (_before_sharding)
            self._load_checkpoint_weights(folder)
        elif self.sharded.shards:  # --fsdp_state_dict_type sharded: every process reads its slices
            self.sharded.restore_shards(folder)
        if zero_state is not None:  # every process: its share of the ZeRO optimizer state
            zero_state.restore(folder)
        if self.text_encoders is not None:
            self.text_encoders.load_checkpoint(folder, folder / WEIGHTS_FILE)
        self.state_parts.restore(folder)  # every registered component; .pt files never unpickle code
        self.state.global_step = state["global_step"]
        self.state.micro_step = state["micro_step"]
        self.state.num_images_seen = state["num_images_seen"]
        if self.text_encoders is not None:
            self.text_encoders.maybe_freeze(self.state.global_step, self.optimizer, self.lr_scheduler)
        self.resumed_from = folder
        self.tracker.continue_from(self.state.global_step)  # hide the steps logged after this checkpoint
        logger.info("resumed from %s at step %d", folder, self.state.global_step)

    def _load_checkpoint_weights(self, folder: Path) -> None:
        from safetensors.torch import load_model

        if self.config.controlnet:
            pass  # the ControlNet comes back with the method's state
        elif self.config.model_type == "lora":
            self.adapter.load_checkpoint(folder / WEIGHTS_FILE)  # any --lora_format; SingLoRA/PiSSA exactly
        else:
            load_model(self._unwrapped_denoiser(), str(folder / FULL_WEIGHTS_FILE))

    # --- the loop ------------------------------------------------------------------------------------

    def fit(self) -> LoopState:
        if self.state.global_step == 0 and self.is_main:
            self.validator.run_benchmark(self.model)
        if self.validator.on_startup and self.state.global_step < self.max_steps:
            with optimizer_mode(self.optimizer, "eval"):  # on every process, so their weights stay equal
                if self.is_main:
                    self.validator.run_startup(self.model, self.state.global_step)
        progress = self.progress_bar()
        while self.state.global_step < self.max_steps:
            self.run_one_step(progress)
        progress.close()
        return self.state

    def progress_bar(self):
        return training_progress_bar(self.max_steps, self.state.global_step, self.show_progress and self.is_main)

    @contextlib.contextmanager
    def _between_steps(self, progress):
        """Validation, checkpoints and evaluation run inside: neither the next step's recorded time
        (``timing/sec_per_step``) nor the progress bar's rate and remaining time count them."""
        started = time.perf_counter()
        with bar_paused(progress):
            yield
        if self._last_step_end is not None:
            self._last_step_end += time.perf_counter() - started

    def run_one_step(self, progress) -> None:
        """One optimizer step and everything that follows it (logging, checkpoint, validation).

        The recorded step time runs from the end of the previous step's optimizer work to the end
        of this one's, so the previous step's logging and bookkeeping are counted too; its
        checkpoint, validation and evaluation are not (``_between_steps``).
        """
        if self._last_step_end is None:
            self._last_step_end = time.perf_counter()
        loss, grad_norm, terms = self.optimization_step()
        now = time.perf_counter()
        seconds = now - self._last_step_end
        self._last_step_end = now
        counted_before = self.state.global_step
        self._after_step(loss, grad_norm, seconds, progress)
        if terms and self.state.global_step > counted_before:  # not for a batch --nan_action skip_batch dropped
            self.tracker.log_scalars({f"loss/{name}": value for name, value in terms.items()}, self.state.global_step)

    def optimization_step(self) -> tuple[float | None, float | None, dict[str, float]]:
        """``gradient_accumulation_steps`` micro-batches, then one optimizer step. A batch with a NaN or
        infinite loss never updates the weights, the LR schedule or the EMA (``_after_step`` then stops
        the run or, with ``--nan_action skip_batch``, goes on without counting the step). Returns the
        loss, the gradient norm and the method's named terms (this process's mean over micro-batches).
        The loss is None for a step that trained only the method's own modules (a distillation critic
        step): the model computed no loss, so there is none to log or to check."""
        accelerator = self.accelerator
        denoiser = self.model.denoiser
        micro_losses: list[float] = []
        terms: dict[str, float] = {}
        grad_norm = None
        update = True
        model_updated = True
        for _ in range(self.config.gradient_accumulation_steps):
            batch = self._next_local_batch()
            with accelerator.accumulate(denoiser):
                output = self._batch_loss(batch)
                model_updated = output.updates_model  # False: the method trained only its own modules
                if model_updated:
                    accelerator.backward(output.loss * self.data_ranks.loss_scale)  # x sp_size: sequence_parallel.py
                micro_losses.append(output.loss.detach().item())  # read before the update it may have to stop
                for name, value in output.logs.items():
                    terms[name] = terms.get(name, 0.0) + float(value) / self.config.gradient_accumulation_steps
                if accelerator.sync_gradients and model_updated:
                    distributed.average_gradients(accelerator, self.method_parameters)
                    if self.grad_accumulator is not None:
                        self.grad_accumulator.write_back()
                    grad_norm = clip_gradients(accelerator, self.trainable, self.config)
                    update = self.nan_guard.update_allowed(accelerator, micro_losses)
                if model_updated and (update or accelerator.scaler is not None):  # fp16's scaler drops non-finite steps
                    self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=bool(self.config.set_grads_to_none))
            self.state.micro_step += 1
            self.state.num_images_seen += batch["latent_mean"].shape[0] * self.data_ranks.size
        if update:
            self.lr_scheduler.step()
            if self.ema is not None and model_updated:
                self.ema.update()
            if self.text_encoders is not None:
                self.text_encoders.maybe_freeze(self.state.global_step + 1, self.optimizer, self.lr_scheduler)
        local_loss = sum(micro_losses) / self.config.gradient_accumulation_steps
        if getattr(self.launcher, "check_rank_sync", False):
            distributed.check_rank_sync(accelerator, self.state.global_step + 1, local_loss, self.trainable)
        loss = distributed.mean_over_processes(accelerator, local_loss)  # the loss of the whole global batch
        return loss if model_updated else None, None if grad_norm is None else float(grad_norm), terms

    def _batch_loss(self, batch: dict):
        """The method's loss of ``batch`` plus each active regularizer's term (their hooks record only
        during this forward), with every named term."""
        with self.regularizers.capturing():
            output = self.method.compute_loss(batch, self.accelerator.device, step=self.state.global_step)
        return self.regularizers.add_terms(output, batch, self.state.global_step)

    def _next_local_batch(self) -> dict:
        """Every process walks the same seeded batch order and keeps every N-th batch, so the
        processes train on different images and the order survives a resume unchanged."""
        processes, rank = self.data_ranks.size, self.data_ranks.rank  # with --sp_size, a group shares one batch
        batch = None
        step = self.state.global_step
        for index in range(processes):
            if index == rank:
                # the batch's randomness depends on its index in the global order, not on the process
                distributed.seed_batch(self.batch_seed_base, self.data.state_dict()["draws"])
                batch = self.data.next_batch(step)
                if self.batch_inspector is not None:
                    self.batch_inspector.observe(batch, step + 1)
            else:
                self.data.skip_batch(step)
        return batch

    def _after_step(self, loss: float | None, grad_norm: float | None, seconds: float, progress) -> None:
        state = self.state
        if loss is not None and not self._loss_is_finite(loss):
            return  # --nan_action skip_batch: the batch's update was dropped and the step does not count
        state.global_step += 1
        if loss is not None:  # None: a step of the method's own modules only (its terms are logged)
            state.losses.append(loss)
        state.step_seconds.append(seconds)
        lr = float(self.lr_scheduler.get_last_lr()[0])  # torchao optimizers keep lr as a tensor
        scalars = {"lr": lr, "timing/sec_per_step": seconds, **({"loss/train": loss} if loss is not None else {})}
        if grad_norm is not None:
            scalars["grad_norm"] = grad_norm
        self.tracker.log_scalars(scalars, state.global_step)
        if self.webhooks.progress_due(state.global_step) and state.losses:
            self._notify_progress(state.losses[-1], lr)
        if self.batch_inspector is not None and state.global_step % self.steps_per_epoch == 0:
            self.batch_inspector.end_epoch(state.global_step // self.steps_per_epoch)
        progress.update(1)
        progress.set_postfix(loss=f"{loss:.4f}" if loss is not None else "(critic step)", lr=f"{lr:.2e}", refresh=False)
        interval = self.config.accelerator_cache_clear_interval
        if interval and state.global_step % interval == 0:
            clear_accelerator_cache(self.accelerator.device)
        kind = self.checkpoint_schedule.kind_at(state.global_step)  # step/epoch interval, or rolling
        if kind is not None:
            with self._between_steps(progress):
                self.accelerator.wait_for_everyone()
                with optimizer_mode(self.optimizer, "eval"):  # schedule-free: save the averaged weights
                    self.save_checkpoint(rolling=kind == ROLLING)
        if self.validator.due(state.global_step):
            # on every process, so their weights stay equal
            with self._between_steps(progress), optimizer_mode(self.optimizer, "eval"):
                if self.is_main:
                    self.validate(state.global_step)
        evaluating = self.eval_loss is not None or self.clip_eval is not None
        if evaluating and self.eval_schedule.due(state.global_step):
            with self._between_steps(progress):
                self.evaluate(state.global_step)

    def _loss_is_finite(self, loss: float) -> bool:
        """False for a batch dropped by ``--nan_action skip_batch``; a non-finite loss under ``stop`` (or
        too many skipped in a row) raises FloatingPointError saying which checkpoint is usable."""
        if math.isfinite(loss):
            self.nan_guard.finite_step()
            return True
        lr = float(self.lr_scheduler.get_last_lr()[0])  # not stepped for this batch: the rate it trained with
        self.nan_guard.nonfinite_step(self.state.global_step + 1, loss, lr,
                                      ckpt.newest_checkpoint_note(self.output_dir))
        return False

    def evaluate(self, step: int) -> dict[str, float]:
        """The eval loss of the live weights (schedule-free: the averaged ones), on every process, and
        the CLIP score, on the main process only; the main process logs both and sends them to the
        tracker in one call."""
        encoders = list(self.text_encoders.encoders.values()) if self.text_encoders is not None else []
        scalars: dict[str, float] = {}
        with optimizer_mode(self.optimizer, "eval"):
            if self.eval_loss is not None:
                scalars.update(self.eval_loss.run(self.model.denoiser, *encoders))
            if self.clip_eval is not None and self.is_main:
                scalars.update(self.clip_eval.run(self.model))
        if self.is_main and scalars:
            self.tracker.log_scalars(scalars, step)
            logger.info("step %d: %s", step, ", ".join(f"{key} {value:.6f}" for key, value in scalars.items()))
        return scalars

    def _notify_progress(self, loss: float, lr: float) -> None:
        state = self.state
        recent = state.step_seconds[-self.webhooks.interval:]
        recent_losses = state.losses[-self.webhooks.interval:]
        self.webhooks.send(
            "progress", f"step {state.global_step}/{self.max_steps}, loss {loss:.4f}",
            step=state.global_step, max_steps=self.max_steps,
            epoch=(state.global_step - 1) // self.steps_per_epoch + 1, loss=loss,
            mean_loss=sum(recent_losses) / len(recent_losses), lr=lr, num_images_seen=state.num_images_seen,
            seconds_per_step=sum(recent) / len(recent),
        )

    def validate(self, step: int) -> None:
        """Validation images from the live weights, the EMA weights, or both (``--ema_validation``)."""
        mode = (self.config.ema_validation or "comparison") if self.ema is not None else "none"
        if mode in ("none", "comparison"):
            self.validator.run(self.model, step)
            self._notify_validation(step, f"step_{step}")
        if mode in ("ema_only", "comparison"):
            with self.ema.applied():
                self.validator.run(self.model, step, label=f"step_{step}_ema")
            self._notify_validation(step, f"step_{step}_ema")

    def _notify_validation(self, step: int, label: str) -> None:
        folder = self.output_dir / "validation" / label
        grids = sorted(str(path) for path in folder.glob("grid_*.png"))
        images = sorted(str(path) for path in folder.glob("*.png") if not path.name.startswith("grid_"))
        previews = sorted(str(path) for path in folder.glob("previews/*.png"))  # --validation_preview
        self.webhooks.send("validation", f"validation images for step {step} written to {folder}",
                           step=step, folder=str(folder), grids=grids, images=images,
                           **({"previews": previews} if previews else {}))

    # --- outputs -------------------------------------------------------------------------------------

    def _provenance(self) -> dict[str, str]:
        from simpletuner import __version__
        from simpletuner.publishing.model_card import modelspec_metadata

        return {
            "simpletuner_version": __version__,
            "base_model": self.model.model_path,
            "model_family": self.config.model_family,
            "global_step": str(self.state.global_step),
            "num_images_seen": str(self.state.num_images_seen),
            **modelspec_metadata(self.config),  # --modelspec_comment
        }

    def _save_lora(self, folder: Path) -> Path:
        """The adapter (and text-encoder LoRAs) in ``--lora_format``, provenance in its metadata."""
        return self.adapter.save(folder, self.text_encoders, self._provenance())

    def save_final(self) -> Path | None:
        """The run's product: a LoRA file or a full pipeline folder, plus EMA weights beside it.

        A schedule-free optimizer is left in eval mode: training is over, and the weights in memory
        are then the averaged ones that were saved.
        """
        self.accelerator.wait_for_everyone()
        set_optimizer_mode(self.optimizer, "eval")
        with self._gathered_for_saving(with_optimizer=False):  # FSDP2: every process takes part
            if not self.is_main:
                return None
            result = self._write_final()
        logger.info("saved %s", result)
        if self.validator.enabled and not self.validator.due(self.state.global_step):
            self.validate(self.state.global_step)
        self.tracker.close()
        if self.batch_inspector is not None:
            self.batch_inspector.end_run()
        self._publish(result)
        self.webhooks.send("run_finished", f"training finished at step {self.state.global_step}: {result}",
                           step=self.state.global_step, num_images_seen=self.state.num_images_seen,
                           output=str(result), final_loss=self.state.losses[-1] if self.state.losses else None,
                           seconds_per_step=self.step_time_median())
        return result

    def _write_final(self) -> Path:
        """The main process writes the LoRA file or pipeline folder (and EMA weights beside it)."""
        with self.memory.saving(self.model, getattr(self.text_encoders, "encoders", None)):  # --offload_during_save
            if self.config.controlnet:  # a controlnet/ folder diffusers loads (methods/controlnet.py)
                from simpletuner.methods.controlnet import save_controlnet

                result = save_controlnet(self.model, self.output_dir)
            elif self.config.model_type == "lora":
                result = self._save_lora(self.output_dir)
                if self.ema is not None:
                    with self.ema.applied():
                        self._save_lora(self.output_dir / "ema")
                if self.config.save_text_encoder and self.text_encoders is not None:
                    for folder in self.text_encoders.save_pretrained(self.output_dir):
                        logger.info("saved the trained text encoder to %s", folder)
            else:
                with self._unfused_layout():
                    result = self.model.save_full(self.output_dir / "pipeline", self._unwrapped_denoiser())
                if self.ema is not None:
                    with self.ema.applied(), self._unfused_layout():
                        self.model.save_full(self.output_dir / "ema" / "pipeline", self._unwrapped_denoiser())
        return result

    def _publish(self, result: Path) -> None:
        """Model card, --push_to_hub, --publishing_config uploads, --post_upload_script (publishing/final.py)."""
        from simpletuner.publishing.final import publish_final

        self.post_upload = publish_final(self, result)

    def _unfused_layout(self):
        """While a full model is written: the separate q/k/v projections every loader expects."""
        from simpletuner.models.qkv_fusion import fusion_of

        denoiser = self._unwrapped_denoiser()
        fusion = fusion_of(denoiser)
        return fusion.unfused(denoiser) if fusion is not None else contextlib.nullcontext()

    # --- reporting -----------------------------------------------------------------------------------

    def startup_summary(self) -> str:
        config = self.config
        denoiser = self._unwrapped_denoiser()
        total = sum(whole_numel(p) for p in denoiser.parameters())
        trainable = sum(whole_numel(p) for p in self.trainable)
        effective = config.train_batch_size * config.gradient_accumulation_steps * self.data_ranks.size
        lines = [
            "=== simpletuner run ===",
            f"model:        {config.model_family} ({self.model.model_path}), prediction {self.model.prediction_type}",
            f"training:     {config.model_type}"
            + (f" rank {config.lora_rank}" if config.model_type == "lora" else "")
            + f", {trainable:,} of {total:,} parameters trainable ({100 * trainable / max(total, 1):.2f}%)",
            f"precision:    {config.mixed_precision}, device {self.accelerator.device}, processes {self.accelerator.num_processes}"
            + self._engine_note(),
            f"batch:        {config.train_batch_size} x {config.gradient_accumulation_steps} accumulation x "
            + (f"{self.data_ranks.size} groups of {config.sp_size} processes (sequence parallel)"
               if config.sp_size > 1 else f"{self.accelerator.num_processes} processes")
            + f" = {effective} images per step",
            f"steps:        {self.max_steps} ({self.steps_per_epoch} per epoch), starting at {self.state.global_step}",
            f"optimizer:    {config.optimizer}, lr {config.learning_rate}"
            + (f" scaled to {self.learning_rate:g}" if config.lr_scale else "") + f" ({config.lr_scheduler}, warmup {config.lr_warmup_steps})",
            *filter(None, [self.memory.describe()]),
            *([f"attention:    {note}"] if (note := getattr(self, "attention_note", None)) else []),
            self.data.describe(),
            f"output:       {self.output_dir}",
            *self.notes,
        ]
        return "\n".join(lines)

    def _engine_note(self) -> str:
        """How the processes share the work, when it is not plain data parallel."""
        if getattr(self, "zero", None) is not None:
            stage = self.accelerator.state.deepspeed_plugin.zero_stage
            if self.accelerator.num_processes == 1:  # ZeRO-Offload: its gain is what --deepspeed_config offloads
                return f", DeepSpeed ZeRO stage {stage} (one process)"
            split = {1: "optimizer state", 2: "optimizer state and gradients"}.get(stage, "weights, gradients and "
                                                                                      "optimizer state")
            return f", DeepSpeed ZeRO stage {stage} ({split} split over the processes)"
        if getattr(self, "sharded", None) is not None:
            return ", FSDP2 (weights, gradients and optimizer state split over the processes)"
        return ""

    def step_time_median(self) -> float:
        return median(self.state.step_seconds) if self.state.step_seconds else float("nan")


def whole_numel(parameter: torch.Tensor) -> int:
    """A parameter's full size, also when ZeRO-3 keeps only a slice of it here (its ``ds_numel``)."""
    return int(getattr(parameter, "ds_numel", parameter.numel()))


def planned_max_steps(config, steps_per_epoch: int) -> int:
    """How many optimizer steps the run takes.

    ``--max_train_steps`` alone decides when it is set and ``--num_train_epochs`` was left at its
    default; when the user set both, the run ends at whichever comes first, unless
    ``--ignore_final_epochs`` says the step count wins (e.g. after the dataset shrank and an epoch
    now has fewer steps than planned).
    """
    by_epochs = config.num_train_epochs * steps_per_epoch
    if not config.max_train_steps:
        return by_epochs
    if config.ignore_final_epochs or "num_train_epochs" not in config.explicit or not config.num_train_epochs:
        return config.max_train_steps
    if by_epochs < config.max_train_steps:
        logger.info("--num_train_epochs %d ends the run after %d steps, before --max_train_steps %d "
                    "(--ignore_final_epochs lets the step count win)", config.num_train_epochs, by_epochs,
                    config.max_train_steps)
    return min(config.max_train_steps, by_epochs)


def train(config, launcher=None, config_file: Path | None = None, show_progress: bool = True,
          dataset_plan=None, notes: list[str] | tuple[str, ...] = ()) -> Trainer:
    """Run a whole training job; returns the finished trainer (tests read its state).

    ``dataset_plan`` is the dataset list checked at start-up (``ResolvedRun.dataset_plan``);
    ``notes`` are lines for the start-up summary (what the pre-flight checks decided).
    """
    trainer = Trainer(config, launcher=launcher, config_file=config_file, show_progress=show_progress,
                      dataset_plan=dataset_plan, notes=notes)
    try:
        trainer.setup()
        try:
            trainer.fit()
            trainer.save_final()
        finally:
            trainer.data.close()  # stops the prefetch thread, also when training fails
            trainer.wait_for_post_checkpoint_scripts()
    except BaseException as error:
        trainer.webhooks.send("run_failed", f"training failed at step {trainer.state.global_step}: "
                              f"{type(error).__name__}: {error}", step=trainer.state.global_step,
                              error_type=type(error).__name__, error=str(error)[:1500])
        raise
    finally:
        trainer.webhooks.close()  # delivers what is queued, waiting a few seconds at most
    return trainer
