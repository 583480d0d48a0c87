"""Write a diffusers denoiser as a GGUF file, offline, for tests of the GGUF loading path.

Real GGUF checkpoints (city96's Flux/SD3/Wan conversions and others) quantize the weight matrices of
linear layers into GGML blocks (Q8_0, Q4_0, ...) and keep everything else (convolutions, norms,
embeddings, biases) as plain float tensors. This writer does the same, with the ``gguf`` package's
own quantizer, under diffusers' parameter names (diffusers then loads the file without converting
keys), so the tiny models of simpletuner.testing can stand in for one.
"""

from __future__ import annotations

from pathlib import Path


def write_denoiser_gguf(module, path: str | Path, quant_type: str = "Q8_0") -> Path:
    """Save ``module``'s state dict to ``path``; Linear weights whose rows fit the block size are
    quantized to ``quant_type`` (a ``gguf.GGMLQuantizationType`` name), the rest stay float32."""
    import gguf
    import numpy as np
    import torch

    kind = gguf.GGMLQuantizationType[quant_type]
    block = gguf.GGML_QUANT_SIZES[kind][0]
    linear_weights = {f"{name}.weight" for name, layer in module.named_modules() if isinstance(layer, torch.nn.Linear)}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="simpletuner-test")
    for name, tensor in module.state_dict().items():
        array = tensor.detach().float().cpu().numpy()
        if name in linear_weights and array.ndim == 2 and array.shape[-1] % block == 0:
            packed = gguf.quants.quantize(array, kind)
            writer.add_tensor(name, packed, raw_shape=packed.shape, raw_dtype=kind)
        else:
            writer.add_tensor(name, array.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def make_gguf_pipeline_folder(source: str | Path, target: str | Path, denoiser: str = "unet",
                              quant_type: str = "Q8_0") -> Path:
    """Copy a diffusers pipeline folder, with its denoiser's weights replaced by a GGUF file next to
    the denoiser's config.json (the layout simpletuner loads a GGUF denoiser from)."""
    import shutil

    from diffusers import UNet2DConditionModel

    source, target = Path(source), Path(target)
    shutil.copytree(source, target, dirs_exist_ok=True)
    folder = target / denoiser
    model_class = UNet2DConditionModel if denoiser == "unet" else None
    if model_class is None:
        import diffusers

        model_class = getattr(diffusers, _config_class(folder))
    module = model_class.from_pretrained(source, subfolder=denoiser)
    for weights in list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")):
        weights.unlink()
    write_denoiser_gguf(module, folder / "diffusion_pytorch_model.gguf", quant_type)
    return target


def _config_class(folder: Path) -> str:
    import json

    return json.loads((folder / "config.json").read_text())["_class_name"]
