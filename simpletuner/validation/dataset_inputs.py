"""``--validation_using_datasets``: validation that starts from pictures of the dataset list.

Image families sample image-to-image: the family's img2img pipeline (diffusers' ``from_pipe``, sharing
every component with the text-to-image one, so the weights being trained are the ones sampled) noises
the picture part of the way and denoises it with the validation prompt, at the pipeline's own default
strength. Video families sample image-to-video: the picture is the first frame of an image-to-video
flavour's clip (validation/video.py takes it as a ``--validation_dataset_file`` entry would give it).

Which pictures: those of ``--eval_dataset_id`` when set, else of the eval datasets, else of the trained
datasets, local folders only; sorted by path, validation prompt ``i`` gets picture ``i`` (cycling when
there are fewer), so every validation starts from the same pictures and steps stay comparable.
``--validation_stitch_input_location`` puts the picture beside each result in the grids.
"""

from __future__ import annotations

from pathlib import Path

from simpletuner.models.registry import families_where

#: Image families whose pipeline has an img2img sibling in diffusers (checked in the tests); read from
#: the family table (``ValidationCapabilities.img2img``).
IMG2IMG_FAMILIES = families_where(lambda info: info.validation.img2img)
#: Video families: the pictures become first frames of an image-to-video flavour
#: (``ValidationCapabilities.image_to_video``).
I2V_FAMILIES = families_where(lambda info: info.validation.image_to_video)


def _source_datasets(plan, dataset_id: str | None, plan_source):
    if dataset_id:
        chosen = [cfg for cfg in plan.images if cfg.id == dataset_id and not cfg.disabled]
        if not chosen:
            raise ValueError(f"--eval_dataset_id {dataset_id!r} names no enabled dataset of {plan_source}")
        return chosen
    return list(plan.eval_datasets) or [cfg for cfg in plan.enabled_images if cfg.dataset_type == "image"]


def dataset_pictures(config) -> list[Path]:
    """Every picture the validation may start from, sorted; ValueError naming the dataset list when
    there is none (remote datasets are not read here)."""
    from simpletuner.data.config import load_dataset_plan
    from simpletuner.data.metadata import IMAGE_EXTENSIONS

    source = config.data_backend_config
    plan = load_dataset_plan(source)
    pictures: list[Path] = []
    remote = []
    for cfg in _source_datasets(plan, config.eval_dataset_id, source):
        if cfg.type != "local" or not cfg.instance_data_dir:
            remote.append(cfg.id)
            continue
        folder = Path(cfg.instance_data_dir).expanduser()
        pictures.extend(sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS))
    if not pictures:
        skipped = f" ({', '.join(remote)} are not local folders)" if remote else ""
        raise ValueError(f"no pictures found in the datasets of {source}{skipped}; "
                         "point --eval_dataset_id at a local image dataset")
    return pictures


def pictures_for_prompts(config, count: int) -> list[Path]:
    """One starting picture per validation prompt (``count`` of them), cycling through the pictures."""
    pictures = dataset_pictures(config)
    return [pictures[index % len(pictures)] for index in range(count)]


def load_input(path: Path, size: tuple[int, int]):
    """The picture as RGB, scaled to cover ``size`` and centre-cropped to it (the sample's shape)."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        return ImageOps.fit(image.convert("RGB"), size, method=Image.Resampling.LANCZOS)


def img2img_pipeline(pipeline):
    """The img2img sibling of a text-to-image pipeline, sharing its components."""
    from diffusers import AutoPipelineForImage2Image

    return AutoPipelineForImage2Image.from_pipe(pipeline)


def stitch_input(picture, tile, side: str):
    """``tile`` with the starting picture (scaled to its height) on the ``side`` given."""
    from PIL import Image

    picture = picture.convert("RGB").resize((round(picture.width * tile.height / picture.height), tile.height))
    canvas = Image.new("RGB", (picture.width + tile.width, tile.height), "white")
    first, second = (picture, tile) if side == "left" else (tile, picture)
    canvas.paste(first, (0, 0))
    canvas.paste(second.convert("RGB"), (first.width, 0))
    return canvas
