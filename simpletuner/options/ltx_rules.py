"""Config rules for LTX-Video, checked before anything loads (torch-free, like every rule).

That the ``--ltx_*`` options are only set for ``--model_family ltxvideo`` is checked generically (the
family lists them in the registry). The rules here refuse combinations whose settings would do
nothing, so nobody trains for hours believing an option was in effect:

* the three image-to-video options only act in ``--ltx_train_mode i2v``;
* image-to-video validation starts from a picture, so text-only validation prompts are refused
  (``--validation_dataset_file`` entries carry one);
* ``--ltx_i2v_prob 0`` in i2v mode would train text-to-video only;
* ``--ltx_protect_first_frame`` keeps every first frame exactly clean, so a ``--ltx_i2v_prob`` below 1
  or a ``--ltx_partial_noise_fraction`` above 0 contradicts it.
"""

from __future__ import annotations

from simpletuner.options import ConfigError

#: Options that shape the image-to-video conditioning frame (``--ltx_train_mode i2v`` only).
I2V_OPTIONS = ("ltx_i2v_prob", "ltx_partial_noise_fraction", "ltx_protect_first_frame")


def check_ltx(config) -> None:
    if config.model_family != "ltxvideo":
        return
    mode = config.ltx_train_mode or "t2v"
    if mode != "i2v":
        changed = [name for name in I2V_OPTIONS if getattr(config, name) not in (None, False)]
        if changed:
            raise ConfigError(f"`--{changed[0]}` shapes image-to-video training, but `--ltx_train_mode` is {mode}; "
                              f"add `--ltx_train_mode i2v` or remove `--{changed[0]}`")
        return
    prompts = [name for name in ("validation_prompt", "validation_prompt_library", "user_prompt_library")
               if getattr(config, name)]
    if prompts and not config.validation_disable:
        raise ConfigError(f"`--ltx_train_mode i2v` validates with LTXImageToVideoPipeline, which starts every video "
                          f"from a picture, and `--{prompts[0]}` gives prompts without one; list the prompts in "
                          "`--validation_dataset_file` with an image_path each, or remove it")
    if config.ltx_i2v_prob == 0:
        raise ConfigError("`--ltx_i2v_prob` = 0 trains no sample image-to-video; set it above 0 or use "
                          "`--ltx_train_mode t2v`")
    if config.ltx_protect_first_frame:
        probability, level = config.ltx_i2v_prob, config.ltx_partial_noise_fraction
        if probability is not None and probability < 1:
            raise ConfigError(f"`--ltx_protect_first_frame` trains every sample from a clean first frame, but "
                              f"`--ltx_i2v_prob` = {probability:g} would train some without one; remove one of them")
        if level is not None and level > 0:
            raise ConfigError(f"`--ltx_protect_first_frame` keeps the first frame exactly clean, but "
                              f"`--ltx_partial_noise_fraction` = {level:g} would noise it; remove one of them")


LTX_RULES = (check_ltx,)
