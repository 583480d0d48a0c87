"""Sequence parallel (``--sp_size``): one clip's tokens split across a group of processes.

diffusers does the splitting. A video transformer that supports it carries a context-parallel plan
(``_cp_plan``): hooks cut the hidden states (and the RoPE tables) along the sequence where the blocks
start, every attention exchanges the slices with an all-to-all so that each process attends over the
whole sequence for a share of the heads (Ulysses), and the output is gathered again at ``proj_out``.
The backward pass runs through the same all-to-alls (``TemplatedUlyssesAttention``).

Which plan: the model's own ``_cp_plan``, except where that plan cannot train and simpletuner passes
its own (:func:`split_plan`). LTX-Video is that case: diffusers' plan cuts the text tokens too and
sends the cross-attention through the all-to-all, which fails twice in diffusers 0.42 -- the forward
pass with the text mask (the mask keeps every head while the query holds only its share), and the
backward pass without it (``TemplatedUlyssesAttention.backward`` reshapes the key and value
gradients with the query's local length, which the text does not have). simpletuner's plan for it
leaves the text whole on every process, cuts only the video tokens, their rotary tables and their
per-token timesteps, and lets the cross-attention run locally: each process's slice of queries
attends over all the text, which is exactly its rows of the full attention. Wan's plan and processor
already work that way.

What simpletuner adds around it:

* **Groups.** With ``P`` processes and ``--sp_size S`` the ranks form ``P / S`` groups of ``S``
  consecutive ranks. The ranks of a group must train the same batch with the same noise, so the data
  is sharded by the group's index (:class:`DataRanks`), and the per-batch seeds, which depend only on
  a batch's position in the global order, come out equal inside a group by themselves.
* **Gradients.** The gather's backward hands each process only the gradient of its own slice, so a
  process's parameter gradients cover its slice of the tokens: the group's full gradient is the SUM
  over its ranks (measured: equal to a single process within 3e-8). DDP averages over all ``P``
  ranks, i.e. ``1/S`` of the mean over groups, so the loss is multiplied by ``S`` before the backward
  pass (:attr:`DataRanks.loss_scale`); every rank then holds the mean over groups, as with plain DDP.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataRanks:
    """How the data is divided among the processes.

    Attributes:
        size: how many different batches one step trains (the data-parallel degree, processes / sp_size).
        rank: which of them this process trains (its group's index).
        loss_scale: factor on the loss before the backward pass; see the module docstring.

    The data build gets ``size`` and ``rank`` too, so the processes of group 0 all count as its "main
    process" for the shared scan and index files; they build one after another
    (``main_process_first``), and the later ones find those files complete.
    """

    size: int
    rank: int
    loss_scale: float = 1.0


def data_ranks(num_processes: int, process_index: int, sp_size: int) -> DataRanks:
    """The data-parallel degree and rank of ``process_index`` when groups of ``sp_size`` consecutive ranks
    share a batch (``sp_size`` 1: every process is its own group, as with plain DDP)."""
    sp_size = max(1, int(sp_size or 1))
    if num_processes % sp_size:
        raise RuntimeError(f"--sp_size {sp_size} needs a multiple of {sp_size} processes, but {num_processes} were "
                           "started; set TRAINING_NUM_PROCESSES in config.env to a multiple of --sp_size")
    return DataRanks(size=num_processes // sp_size, rank=process_index // sp_size, loss_scale=float(sp_size))


def enable_sequence_parallel(denoiser: torch.nn.Module, sp_size: int, device: torch.device):
    """Split ``denoiser``'s tokens across groups of ``sp_size`` processes with its diffusers
    context-parallel plan; returns diffusers' ``ParallelConfig`` (None when ``sp_size`` is 1).

    Call it after the adapter is attached (a LoRA layer on a planned module must see the slice, not the
    gathered output) and before the model is wrapped for DDP. The mesh is built over the default
    process group accelerate initialised: ``(data parallel, ring 1, ulysses sp_size)``.

    The steps are those of ``ModelMixin.enable_parallelism`` (set the config on the model and its
    attention processors, then ``apply_context_parallel`` with the model's ``_cp_plan``), done here
    because diffusers 0.42's version picks the device as ``rank % torch.accelerator.device_count()``,
    a division by zero on a CPU, where the tests run; the device here is accelerate's.
    """
    if sp_size <= 1:
        return None
    import torch.distributed as dist
    from diffusers.hooks.context_parallel import apply_context_parallel
    from diffusers.models._modeling_parallel import ContextParallelConfig, ParallelConfig
    from torch.distributed.device_mesh import init_device_mesh

    transformers = _planned_transformers(denoiser)
    if not transformers:
        raise RuntimeError(f"--sp_size: {type(denoiser).__name__} has no context-parallel plan in diffusers")
    for transformer in transformers:
        _check_heads(transformer, sp_size)
        _check_attention_backend(transformer)
    world, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh(device.type, (world // sp_size, 1, sp_size), mesh_dim_names=("dp", "ring", "ulysses"))
    config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=sp_size, mesh=mesh))
    config.setup(rank, world, device, mesh=mesh)
    randomness = SliceRandomness(rank % sp_size, device)
    for transformer in transformers:
        plan = split_plan(transformer)
        transformer._parallel_config = config
        for processor in _exchanging_processors(transformer, plan):
            processor._parallel_config = config
        apply_context_parallel(transformer, config.context_parallel_config, plan.hooks)
        transformer.register_forward_pre_hook(_sequence_check(transformer, sp_size), with_kwargs=True)
        transformer.register_forward_pre_hook(randomness.enter)
        transformer.register_forward_hook(randomness.leave)
    logger.info("sequence parallel: %d group(s) of %d processes split %s's tokens (Ulysses all-to-all)",
                world // sp_size, sp_size, " and ".join(type(t).__name__ for t in transformers))
    return config


@dataclass(frozen=True)
class SplitPlan:
    """Where one transformer's tokens are cut and gathered.

    Attributes:
        hooks: diffusers' context-parallel plan format (module path -> ``ContextParallelInput`` dict or
            ``ContextParallelOutput``), handed to ``apply_context_parallel``.
        local_attention: names of attention modules (the last part of their path, e.g. ``attn2``) that
            must NOT exchange slices: their keys and values come from tokens the plan leaves whole on
            every process (the text), so each process attends with its own queries over all of them.
            Sending them through the all-to-all as well would hand every process the text ``sp_size``
            times over.
    """

    hooks: dict[str, Any]
    local_attention: tuple[str, ...] = ()


def split_plan(transformer: torch.nn.Module) -> SplitPlan:
    """simpletuner's own plan for a transformer whose diffusers plan cannot train, else diffusers' plan."""
    own = OWN_PLANS.get(type(transformer).__name__)
    return own() if own is not None else SplitPlan(hooks=transformer._cp_plan)


def ltx_video_plan() -> SplitPlan:
    """LTX-Video: cut the video tokens, the rotary tables and per-token timesteps; keep the text whole.

    ``hidden_states`` arrives packed, ``[batch, tokens, channels]``, and is cut along the tokens before
    ``proj_in``. The rotary embedding is computed from the frame/height/width counts for the whole
    clip, so its two tables (cos, sin: ``[batch, tokens, dim]``) are cut on the way out. A timestep per
    token (``[batch, tokens]``: image-to-video, causal SFT) is cut the same way so the adaptive norms
    line up with the slice; a timestep per sample (``[batch]``) is left as it is (diffusers logs once
    that it did not split a 1-D input). The text (``encoder_hidden_states``, its mask) is not in the
    plan, so every process keeps all of it, and the blocks' cross-attention (``attn2``) runs locally.
    ``proj_out`` gathers the slices again. Returned by a function so diffusers is imported only here.
    """
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    def cut(dims: int, output: bool = False) -> ContextParallelInput:
        return ContextParallelInput(split_dim=1, expected_dims=dims, split_output=output)

    return SplitPlan(
        hooks={
            "": {"hidden_states": cut(3), "timestep": cut(2)},
            "rope": {0: cut(3, output=True), 1: cut(3, output=True)},
            "proj_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
        },
        local_attention=("attn2",),
    )


#: diffusers class name -> simpletuner's plan for it, where diffusers' own ``_cp_plan`` cannot train
#: (see the module docstring; tests/training/test_sequence_parallel.py proves each one against 1 process).
OWN_PLANS: dict[str, Callable[[], SplitPlan]] = {"LTXVideoTransformer3DModel": ltx_video_plan}


def _planned_transformers(denoiser: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformers to split: the denoiser itself, or the experts inside a two-expert Wan denoiser."""
    if getattr(denoiser, "_cp_plan", None) is not None:
        return [denoiser]
    return [module for module in denoiser.modules() if getattr(module, "_cp_plan", None) is not None]


def _attention_processors(denoiser: torch.nn.Module) -> list:
    return [processor for _, processor in _named_attention_processors(denoiser)]


def _named_attention_processors(denoiser: torch.nn.Module) -> list[tuple[str, Any]]:
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention

    return [(name, module.processor) for name, module in denoiser.named_modules()
            if isinstance(module, (Attention, AttentionModuleMixin)) and hasattr(module.processor, "_parallel_config")]


def _exchanging_processors(transformer: torch.nn.Module, plan: SplitPlan) -> list:
    """The attention processors that get the parallel config (and so the all-to-all): all but those of
    ``plan.local_attention``. One processor object shared by both kinds cannot be set either way."""
    exchanging, local = [], []
    for name, processor in _named_attention_processors(transformer):
        (local if name.rsplit(".", 1)[-1] in plan.local_attention else exchanging).append(processor)
    if {id(p) for p in exchanging} & {id(p) for p in local}:
        raise RuntimeError(f"--sp_size: {type(transformer).__name__}'s self- and cross-attention share one attention "
                           f"processor object, so the cross-attention ({', '.join(plan.local_attention)}) cannot "
                           "run locally; give each attention module its own processor")
    return exchanging


def _check_heads(denoiser: torch.nn.Module, sp_size: int) -> None:
    """Ulysses gives each process ``heads / sp_size`` heads: the head count must divide."""
    heads = getattr(denoiser.config, "num_attention_heads", None)
    if heads is not None and heads % sp_size:
        raise RuntimeError(f"--sp_size {sp_size}: {type(denoiser).__name__} has {heads} attention heads, which do not "
                           f"split evenly over {sp_size} processes; use an --sp_size that divides {heads}")


def _check_attention_backend(denoiser: torch.nn.Module) -> None:
    """The attention backend in use must have a context-parallel form (the rules check the option)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    for processor in _attention_processors(denoiser):
        backend = getattr(processor, "_attention_backend", None)
        backend = AttentionBackendName(backend) if backend else _AttentionBackendRegistry.get_active_backend()[0]
        if not _AttentionBackendRegistry._is_context_parallel_available(backend):
            raise RuntimeError(f"--sp_size: attention backend {backend.value!r} has no context-parallel form; use "
                               "--attention_mechanism diffusers")


def _sequence_check(denoiser: torch.nn.Module, sp_size: int):
    """A forward pre-hook: the clip's token count must split evenly, said before diffusers' bare assert."""

    def check(module, args, kwargs):
        counted = _clip_tokens(denoiser, kwargs.get("hidden_states", args[0] if args else None), kwargs)
        if counted is None:
            return None
        tokens, clip, grid = counted
        if tokens % sp_size:
            raise RuntimeError(f"--sp_size {sp_size}: a clip of {clip} makes {tokens} tokens, which do not split "
                               f"evenly over {sp_size} processes; choose a frame count or resolution whose token count "
                               f"({grid}) is a multiple of {sp_size}")
        return None

    return check


def _clip_tokens(denoiser: torch.nn.Module, latents, kwargs: dict) -> tuple[int, str, str] | None:
    """``(tokens, the clip in words, the token grid)`` of one forward pass, or None when unknown.

    Wan takes ``[B, C, F, H, W]`` latents and patches them itself (``patch_size`` a 3-tuple); LTX-Video
    takes tokens already packed, ``[B, tokens, C]``, with the latent grid in ``num_frames`` /
    ``height`` / ``width`` (``patch_size`` and ``patch_size_t`` plain numbers).
    """
    if not isinstance(latents, torch.Tensor):
        return None
    if latents.dim() == 3:
        tokens = latents.shape[1]
        grid = [kwargs.get(name) for name in ("num_frames", "height", "width")]
        if any(not isinstance(size, int) for size in grid):
            return tokens, "packed latents", str(tokens)
        frames, height, width = grid
        return tokens, f"{frames} latent frames x {height} x {width} tokens", f"{frames} x {height} x {width}"
    patch = getattr(denoiser.config, "patch_size", None) or (1, 1, 1)
    if isinstance(patch, int):
        patch = (getattr(denoiser.config, "patch_size_t", None) or 1, patch, patch)
    if latents.dim() != 5 or len(patch) != 3:
        return None
    frames, height, width = (size // step for size, step in zip(latents.shape[2:], patch))
    return (frames * height * width, f"{latents.shape[2]} latent frames x {latents.shape[3]} x {latents.shape[4]} "
            "latents", f"{frames} x {height} x {width}")


class SliceRandomness:
    """Dropout inside the split denoiser draws a different mask for every slice.

    The ranks of a group start each batch with the same random state (that is what gives them the same
    noise and timesteps), so a dropout layer (LoRA dropout, 0.1 by default) would drop the same positions
    in every slice of the clip. For the forward pass only, each rank switches to a stream of its own,
    seeded from one draw of the shared state plus its place in the group; afterwards the shared state
    is put back untouched, so whatever the step draws after the forward pass is again equal in the group.
    Gradient checkpointing replays the same masks (torch saves the random state of each checkpoint).
    """

    def __init__(self, sp_rank: int, device: torch.device) -> None:
        self.sp_rank = sp_rank
        self.device = device if device.type == "cuda" else None
        self._saved: tuple | None = None

    def enter(self, module, args) -> None:
        cuda_state = torch.cuda.get_rng_state(self.device) if self.device is not None else None
        self._saved = (torch.get_rng_state(), cuda_state)
        shared = int(torch.randint(0, 2**62, (1,)).item())  # the same number on every rank of the group
        torch.manual_seed(shared + self.sp_rank)

    def leave(self, module, args, output) -> None:
        cpu_state, cuda_state = self._saved
        torch.set_rng_state(cpu_state)
        if cuda_state is not None:
            torch.cuda.set_rng_state(cuda_state, self.device)
        self._saved = None
