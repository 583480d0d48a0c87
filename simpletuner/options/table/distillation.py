"""Few-step distillation."""

from __future__ import annotations

from simpletuner.options.spec import Option

_G = "distillation"

OPTIONS: list[Option] = [
    Option(
        name="distillation_method",
        kind="str",
        default=None,
        help="Distil the model into a faster, few-step student (spec 002's name for the method option): dmd runs "
        "--training_method dmd2, lcm runs --training_method lcm; dcm and perflow are refused (no specification "
        "defines them enough to build). Unset trains with --training_method.",
        group=_G,
        choices=("lcm", "dcm", "dmd", "perflow"),
        implemented=True,
    ),
    Option(
        name="distillation_config",
        kind="json",
        default=None,
        help="JSON settings (inline or a file) of the distillation methods (dmd2, f_distill, ladd, lcm): "
        "student_sample_steps, student_timesteps, student_update_freq, guidance_scale, gan_loss_weight_gen, "
        "gan_loss_weight_disc, gan_r1_reg_weight, gan_r1_reg_alpha, fake_score_rank, fake_score_lr, fake_score_warmup_steps, "
        "sample_t_cfg, f_div, ratio_lower, ratio_upper, lcm_skip_steps, lcm_huber_c (documentation/DISTILLATION.md).",
        group=_G,
        implemented=True,
    ),
]
