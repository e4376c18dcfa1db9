"""The MedGemma-4B architecture with random weights, and a processor for it, for the GPU
benchmarks (benchmarks/inference_gpu.py, benchmarks/engine_gpu.py).

The real MedGemma-4B architecture (Gemma 3 4B text + SigLIP-400M vision, 896x896 input, 256
image tokens, 262,208-token vocabulary) is built with random weights directly on the device in
bf16; real weights cannot be downloaded here, and speed and memory do not depend on their
values. ``tiny`` gives a CPU-sized stand-in with the same structure. The processor is the demo
model's offline Gemma tokenizer with the Gemma 3 image processor at the model's input size.
"""

from __future__ import annotations

import gc
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GenerationConfig,
    SiglipVisionConfig,
)

from inference.demo_model import GEMMA3_CHAT_TEMPLATE, _build_tokenizer, _vocabulary
from inference.prefill_attention import CHUNKED_SDPA

VOCAB_4B = 262_208
CHEST_PROMPT = Path(__file__).resolve().parents[1] / "config" / "prompts" / "chest_xray.toml"
# The demo tokenizer has one token per character; Gemma's SentencePiece tokenizer needs about
# 400 tokens for the shipped chest question (1,402 characters of English with JSON). The
# question is cut to this many characters so the prompt has the real model's length.
CHEST_PROMPT_TOKENS = 400


def chest_question(tokens: int = CHEST_PROMPT_TOKENS) -> str:
    """The node's default chest radiograph question (English), cut to ``tokens`` characters."""
    text = tomllib.loads(CHEST_PROMPT.read_text(encoding="utf-8"))["en"].strip()
    return text[:tokens]


def model_config(tiny: bool, image_size: int, mm_tokens: int) -> Gemma3Config:
    """MedGemma-4B (or, with ``tiny``, a CPU-sized stand-in with the same structure)."""
    vocab = _vocabulary()
    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
    }
    size: dict[str, Any] = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=32, sliding_window=16)
        if tiny
        else dict(hidden_size=2560, intermediate_size=10240, num_hidden_layers=34,
                  num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                  query_pre_attn_scalar=256, sliding_window=1024)
    )  # fmt: skip
    text = Gemma3TextConfig(
        vocab_size=len(vocab) if tiny else VOCAB_4B,
        rope_parameters=rope,
        pad_token_id=vocab["<pad>"],
        eos_token_id=[vocab["<eos>"], vocab["<end_of_turn>"]],
        bos_token_id=vocab["<bos>"],
        **size,
    )
    vision_size: dict[str, Any] = (
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
        if tiny
        else dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16)
    )  # fmt: skip
    vision = SiglipVisionConfig(
        image_size=image_size,
        patch_size=4 if tiny else 14,
        vision_use_head=False,
        layer_norm_eps=1e-6,
        **vision_size,
    )
    return Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=mm_tokens,
        boi_token_index=vocab["<start_of_image>"],
        eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"],
    )


def build_model(config: Gemma3Config, device: torch.device) -> Gemma3ForConditionalGeneration:
    """Random weights created on the device in bf16, then put in eval mode."""
    torch.manual_seed(0)
    with torch.device(device):  # the attention the node loads on CUDA (TransformersEngine)
        model = Gemma3ForConditionalGeneration._from_config(
            config, dtype=torch.bfloat16, attn_implementation=CHUNKED_SDPA
        )
    with torch.no_grad():
        # Gemma 3 starts its projector at zero; random values make the image matter.
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.02)
    text: Any = config.get_text_config()
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id,
        eos_token_id=text.eos_token_id,
        pad_token_id=text.pad_token_id,
        do_sample=False,
    )
    return model.eval()


def _image_processor_class() -> Any:
    """The torchvision backend where torchvision is installed (the device), PIL otherwise."""
    try:
        from transformers.models.gemma3.image_processing_gemma3 import Gemma3ImageProcessor

        return Gemma3ImageProcessor
    except ImportError:
        from transformers.models.gemma3.image_processing_pil_gemma3 import (
            Gemma3ImageProcessorPil,
        )

        return Gemma3ImageProcessorPil


def build_processor(image_size: int, mm_tokens: int) -> Gemma3Processor:
    image_processor = _image_processor_class()(
        size={"height": image_size, "width": image_size},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=_build_tokenizer(),
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=mm_tokens,
    )


def chest_image(size: int, seed: int = 0) -> Image.Image:
    """A synthetic radiograph-like image: smooth gradient plus noise, grey in RGB."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    base = 0.5 + 0.3 * np.sin(3 * xx) * np.cos(2 * yy)
    pixels = np.clip(base + 0.1 * rng.standard_normal((size, size)), 0, 1) * 255
    grey = pixels.astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3, axis=-1))


def quantize_nf4(model: Any) -> None:
    """Every nn.Linear but lm_head to bitsandbytes NF4 with bf16 compute (as
    ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")`` loads it)."""
    import bitsandbytes as bnb

    lm_head = model.get_output_embeddings()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if (
                not isinstance(child, nn.Linear)
                or child is lm_head
                or hasattr(child, "quant_state")
            ):
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features, child.out_features, bias=child.bias is not None,
                compute_dtype=torch.bfloat16, quant_type="nf4", device="meta",
            )  # fmt: skip
            weight = child.weight.data.to("cpu")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            if child.bias is not None:
                layer.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer.to(child.weight.device))
            del child
    gc.collect()
    torch.cuda.empty_cache()
