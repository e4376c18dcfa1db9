"""The engine with the fast path attached (as inference.loader does on CUDA) on the tiny model.

On CPU the fast path runs the same static-buffer decode step eagerly (no CUDA graph), so this
checks the wiring and that it gives the same tokens as the plain `model.generate` path.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from config.settings import load_settings
from inference.demo_model import write_demo_model
from inference.engine import GenerationRequest, GenerationSettings
from inference.loader import attach_fast_path
from inference.transformers_engine import TransformersEngine


def test_fast_path_attached_by_the_loader_gives_the_plain_tokens(tmp_path: Path) -> None:
    write_demo_model(tmp_path / "demo")
    settings = load_settings()
    settings.model = settings.model.model_copy(update={"max_batch": 2, "max_new_tokens": 12})
    engine = TransformersEngine(settings.model, weights_dir=tmp_path / "demo")
    requests = [
        GenerationRequest(
            images=[Image.new("RGB", (64, 48), color=(shade, shade, shade))],
            prompt=prompt,
            settings=GenerationSettings(max_new_tokens=12),
        )
        for shade, prompt in ((30, "Describe the chest radiograph."), (200, "Any nodule?"))
    ]
    plain = [result.text for result in engine.generate(requests)]
    engine.wants_fast_path = True  # what a CUDA device sets
    attach_fast_path(engine, settings)
    assert engine._fast_generator is not None
    fast = [result.text for result in engine.generate(requests)]
    assert fast == plain
    assert all(text for text in plain), "the tiny model must produce some text"
