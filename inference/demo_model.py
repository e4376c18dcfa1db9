"""A tiny, randomly initialised MedGemma look-alike for tests and demos.

Real MedGemma weights cannot be downloaded on the machines that build and test the node
(docs/architecture.md, "Model facts"), yet the loading, batching and parsing path must be exercised
for real. ``write_demo_model`` writes a directory with the same layout a Hugging Face snapshot of
``google/medgemma-1.5-4b-it`` has — ``config.json`` (Gemma3ForConditionalGeneration with a SigLIP
vision tower), safetensors weights, a Gemma tokenizer with the Gemma 3 special tokens, the Gemma 3
image processor and processor configs, the chat template and a generation config — so
``TransformersEngine`` loads it through ``AutoProcessor`` and ``AutoModelForImageTextToText``
exactly as it loads the real model.

The weights are random: the text it generates is gibberish. The marker file
``DEMO_MODEL_MARKER`` makes the engine record ``is_test_model=True``, so every output built from
it carries the "TEST MODEL – NOT FOR CLINICAL USE" banner.
"""

from __future__ import annotations

import importlib
import json
import string
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3Processor,
    Gemma3TextConfig,
    GemmaTokenizer,
    GenerationConfig,
    SiglipVisionConfig,
)

DEMO_MODEL_MARKER = "medgemma_node_test_model.json"
DEMO_MODEL_ID = "medgemma-node/tiny-random-gemma3"

# The Gemma 3 vocabulary starts with these ids (pad 0, eos 1, bos 2, unk 3, mask 4); the
# chat and image tokens follow. <unused95> ends MedGemma's thinking block.
SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "<unused94>",
    "<unused95>",
)
IMAGE_SIZE = 64  # pixels per side of the vision tower input
PATCH_SIZE = 16  # 4 x 4 patches
MM_TOKENS_PER_IMAGE = 4  # pooled 2 x 2: the image occupies four soft tokens
SEED = 20240521

# The Gemma 3 chat template: no system role of its own (a system turn is folded into the first
# user turn), "assistant" is spelled "model", images become <start_of_image>.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- else -%}{{ raise_exception('Invalid content type') }}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _vocabulary() -> dict[str, int]:
    """Special tokens, the 256 byte-fallback tokens, then printable ASCII (space as '▁')."""
    pieces = list(SPECIAL_TOKENS)
    pieces += [f"<0x{value:02X}>" for value in range(256)]
    pieces += ["▁"] + [c for c in string.printable if c not in string.whitespace]
    return {piece: index for index, piece in enumerate(pieces)}


def _build_tokenizer() -> GemmaTokenizer:
    """A character-level Gemma tokenizer: byte fallback covers any other text (e.g. Chinese)."""
    vocab = _vocabulary()
    backend = Tokenizer(BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return GemmaTokenizer(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        mask_token="<mask>",
        padding_side="left",
        extra_special_tokens={
            "boi_token": "<start_of_image>",
            "eoi_token": "<end_of_image>",
            "image_token": "<image_soft_token>",
        },
    )


def _image_processor_class() -> Any:
    """The PIL Gemma 3 image processor (no torchvision needed); older transformers releases
    have only the one class."""
    try:
        module = importlib.import_module("transformers.models.gemma3.image_processing_pil_gemma3")
        return module.Gemma3ImageProcessorPil
    except (ImportError, AttributeError):
        return transformers.Gemma3ImageProcessor


def _model_config(vocab: dict[str, int]) -> Gemma3Config:
    text_config = Gemma3TextConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        query_pre_attn_scalar=32,
        max_position_embeddings=2048,
        sliding_window=512,
        layer_types=["sliding_attention", "full_attention"],
        pad_token_id=vocab["<pad>"],
        eos_token_id=[vocab["<eos>"], vocab["<end_of_turn>"]],
        bos_token_id=vocab["<bos>"],
    )
    vision_config = SiglipVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vision_use_head=False,
    )
    return Gemma3Config(
        text_config=text_config,
        vision_config=vision_config,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=vocab["<start_of_image>"],
        eoi_token_index=vocab["<end_of_image>"],
        image_token_index=vocab["<image_soft_token>"],
    )


def _build_model(config: Gemma3Config) -> Gemma3ForConditionalGeneration:
    """Random weights from a fixed seed, without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = Gemma3ForConditionalGeneration(config)
        # The projector starts at zero in Gemma 3 (it is trained from scratch); give it random
        # values so that the image actually changes what the demo model says.
        projector = model.model.multi_modal_projector.mm_input_projection_weight
        with torch.no_grad():
            projector.normal_(0.0, 1.0)
    return model.eval()


def write_demo_model(path: Path) -> None:
    """Write the tiny model, tokenizer, processor, chat template and marker under ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_tokenizer()
    vocab = _vocabulary()
    config = _model_config(vocab)
    image_processor = _image_processor_class()(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=GEMMA3_CHAT_TEMPLATE,
        image_seq_length=MM_TOKENS_PER_IMAGE,
    )
    model = _build_model(config)
    model.generation_config = GenerationConfig(
        bos_token_id=vocab["<bos>"],
        eos_token_id=[vocab["<eos>"], vocab["<end_of_turn>"]],
        pad_token_id=vocab["<pad>"],
        do_sample=False,
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    marker = {
        "model_id": DEMO_MODEL_ID,
        "purpose": "randomly initialised test model; its output is meaningless",
        "clinical_use": False,
    }
    (path / DEMO_MODEL_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
