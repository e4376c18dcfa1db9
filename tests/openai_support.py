"""The OpenAI-compatible engine in the openai engine tests (tests/test_openai*.py): the
served model's name, an engine connected to the test double, and small requests."""

from __future__ import annotations

from PIL import Image

from config.settings import ModelSettings, OpenAIServerSettings
from inference.engine import GenerationRequest, GenerationSettings
from inference.openai_engine import OpenAIEngine

SERVED = "google/medgemma-1.5-4b-it"


def engine_for(base_url: str, **openai: object) -> OpenAIEngine:
    engine = OpenAIEngine(
        ModelSettings(engine="openai", openai=OpenAIServerSettings(base_url=base_url, **openai))
    )
    engine.connect()
    return engine


def solid(value: int, side: int = 64) -> Image.Image:
    return Image.new("RGB", (side, side), (value, value, value))


def request(images: list[Image.Image], prompt: str = "Describe.") -> GenerationRequest:
    return GenerationRequest(images, prompt, GenerationSettings(max_new_tokens=32))
