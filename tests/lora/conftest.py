"""Fixtures of the LoRA tests: the tiny model's module shapes and one LoRA made with PEFT in the diffusers layout."""

from __future__ import annotations

import pytest
import torch

# lora_writers and lora_reference sit beside this file: pytest's default (prepend) import mode puts this folder on
# sys.path for its conftest and test modules, as for every test folder without an __init__.py.


@pytest.fixture(scope="session")
def transformer_shapes(tiny_folder) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of zimage's own transformer on the tiny folder (meta device)."""
    from zimage.weights.lora import linear_shapes
    from zimage.weights.networks import build_transformer

    return linear_shapes(build_transformer(tiny_folder).module)


@pytest.fixture(scope="session")
def text_encoder_shapes(tiny_folder) -> dict[str, tuple[int, int]]:
    """{module: (out, in)} of zimage's own text encoder on the tiny folder (meta device; layers 0..L-2)."""
    from zimage.weights.lora import linear_shapes
    from zimage.weights.networks import build_text_encoder

    return linear_shapes(build_text_encoder(tiny_folder).module)


@pytest.fixture(scope="session")
def peft_lora(tiny_folder, tmp_path_factory):
    """A LoRA made with PEFT on diffusers' tiny transformer, every linear layer, r=4, lora_alpha=8 (scale 2), one
    module at rank 2 (rank_pattern, scale 4) and the w2 layers at alpha 3 (alpha_pattern, scale 0.75), saved with
    ZImagePipeline.save_lora_weights (diffusers layout: transformer.* keys, lora_adapter_metadata in the header).

    Returns (file, factors {module: F} as PEFT holds them, PEFT's own deltas {module: scaling * B @ A})."""
    from diffusers import ZImagePipeline, ZImageTransformer2DModel
    from lora_reference import peft_layer_deltas, randomise_lora_parameters
    from lora_writers import F
    from peft import LoraConfig, get_peft_model_state_dict

    transformer = ZImageTransformer2DModel.from_pretrained(tiny_folder / "transformer", torch_dtype=torch.float32)
    targets = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    config = LoraConfig(r=4, lora_alpha=8, target_modules=targets, rank_pattern={"^layers.0.attention.to_q": 2},
                        alpha_pattern={"feed_forward.w2": 3})
    transformer.add_adapter(config)
    randomise_lora_parameters(transformer, seed=1)
    folder = tmp_path_factory.mktemp("peft-lora")
    ZImagePipeline.save_lora_weights(folder, transformer_lora_layers=get_peft_model_state_dict(transformer),
                                     transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict())
    factors = {}
    for name in targets:
        layer = transformer.get_submodule(name)
        factors[name] = F(layer.lora_A["default"].weight.detach().clone(),
                          layer.lora_B["default"].weight.detach().clone(), float(layer.lora_alpha["default"]))
    return folder / "pytorch_lora_weights.safetensors", factors, peft_layer_deltas(transformer)
