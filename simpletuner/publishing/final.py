"""The end of a run, on the main process: model card, Hub upload, S3 uploads, then the user's script.

Order matters: the card is written first so every upload carries it; each upload that succeeds starts
``--post_upload_script`` with its remote location; a run that uploads nothing still starts the script
once (empty ``{remote_checkpoint_path}``). A failed upload raises after the script of the uploads
before it was started, and the local files stay where they are.
"""

from __future__ import annotations

from pathlib import Path

from simpletuner.publishing.post_upload import PostUploadScript
from simpletuner.publishing.s3 import final_files, load_publishing_targets


def product_path(output_dir: Path, result: Path) -> str:
    """The product (LoRA file or pipeline folder) relative to the output dir, as uploads name it."""
    try:
        return Path(result).relative_to(output_dir).as_posix()
    except ValueError:
        return Path(result).name


def publish_final(trainer, result: Path) -> PostUploadScript | None:
    """Write the card, upload to every target, start the post-upload script; returns the script runner."""
    from simpletuner.publishing.model_card import write_model_card

    config, output_dir, step = trainer.config, Path(trainer.output_dir), trainer.state.global_step
    write_model_card(trainer, result)
    script = PostUploadScript.from_config(config)
    uploaded = False
    if getattr(trainer, "hub", None) is not None:
        trainer.hub.push_final(output_dir, result, step)
        uploaded = True
        if script is not None:
            script.launch(result, step, f"https://huggingface.co/{trainer.hub.repo_id}")
    targets = load_publishing_targets(config.publishing_config)
    if targets:
        files = final_files(output_dir, result, step)
        for target in targets:
            target.upload(output_dir, files)
            uploaded = True
            if script is not None:
                script.launch(result, step, target.uri_for(product_path(output_dir, result)))
    if script is not None and not uploaded:
        script.launch(result, step, "")
    return script
