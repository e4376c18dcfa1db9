"""The engine with the fast path attached (as inference.loader does on CUDA) on the tiny model.

On CPU the fast path runs the same static-buffer decode step eagerly (no CUDA graph), so this
checks the wiring and that it gives the same tokens as the plain `model.generate` path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from config.settings import load_settings
from inference import decode_joins
from inference.demo_model import write_demo_model
from inference.engine import GenerationRequest, GenerationSettings, prompt_groups
from inference.fast_decode import FastGreedyGenerator
from inference.loader import PRIORITY_LONG_KV_TOKENS, attach_fast_path
from inference.transformers_engine import ModelLoadError, TransformersEngine

# The exact tokens of plain generate from the eager decode step (the CPU, and CI). On CUDA the
# engine runs the tiny random model in bf16 through the Triton step, whose float32 reductions
# run in another order: its logits nearly tie, so a token can tip. GPU identity is measured on
# the 4B architecture (benchmarks/ct_gpu.py, benchmarks/engine_gpu.py).
eager_step_only = pytest.mark.skipif(
    torch.cuda.is_available(), reason="exact identity of the eager step (CPU)"
)


@eager_step_only
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


def shaded(count: int, shade: int) -> list[Image.Image]:
    return [Image.new("RGB", (64, 48), color=(shade + i, shade, shade)) for i in range(count)]


def test_prompt_groups_keep_long_studies_apart_in_order() -> None:
    counts = [1, 85, 2, 10, 1, 40, 12]
    requests = [GenerationRequest(images=shaded(n, 0), prompt="Findings?") for n in counts]

    assert prompt_groups(requests) == [[0, 2, 4], [1], [3, 6], [5]]


def test_a_ct_study_among_radiographs_gets_the_tokens_it_gets_alone(tmp_path: Path) -> None:
    write_demo_model(tmp_path / "demo")
    settings = load_settings()
    settings.model = settings.model.model_copy(update={"max_batch": 4, "max_new_tokens": 10})
    engine = TransformersEngine(settings.model, weights_dir=tmp_path / "demo")
    engine.wants_fast_path = True
    attach_fast_path(engine, settings)
    requests = [
        GenerationRequest(
            images=shaded(count, shade),
            prompt=prompt,
            settings=GenerationSettings(max_new_tokens=10),
        )
        for count, shade, prompt in (
            (1, 30, "Describe the chest radiograph."),
            (12, 90, "Describe the CT slices."),
            (1, 200, "Any nodule?"),
        )
    ]

    mixed = engine.generate(requests)
    alone = [engine.generate([request])[0] for request in requests]

    assert [r.text for r in mixed] == [r.text for r in alone]
    assert [r.prompt_tokens for r in mixed] == [r.prompt_tokens for r in alone]
    # The radiographs ran as one batch of two, the CT study apart (it padded nobody).
    assert [r.batch_size for r in mixed] == [2, 1, 2]


@eager_step_only
def test_generate_from_the_step_hook_runs_on_the_priority_generator(tmp_path: Path) -> None:
    write_demo_model(tmp_path / "demo")
    settings = load_settings()
    settings.model = settings.model.model_copy(update={"max_batch": 2, "max_new_tokens": 16})
    engine = TransformersEngine(settings.model, weights_dir=tmp_path / "demo")
    studies = [study_request(30, "Describe the chest radiograph.", 16)]
    question = study_request(200, "Any nodule?", 10)
    plain_studies = [r.text for r in engine.generate(studies)]
    plain_answer = engine.generate([question])[0].text
    engine.wants_fast_path = True  # what a CUDA device sets
    attach_fast_path(engine, settings)
    batch_gen, priority = engine._fast_generator, engine._priority_generator
    assert isinstance(batch_gen, FastGreedyGenerator)
    assert isinstance(priority, FastGreedyGenerator)
    assert priority.max_batch == settings.interactive.max_batch
    used: list[str] = []
    record_calls(batch_gen, "batch", used)
    record_calls(priority, "priority", used)
    answers: list[str] = []

    def hook() -> None:  # what the worker does: answer a waiting question, once
        if not answers:
            answers.extend(r.text for r in engine.generate([question]))

    engine.set_step_hook(hook)
    try:
        interrupted = [r.text for r in engine.generate(studies)]
    finally:
        engine.set_step_hook(None)
    assert used == ["batch", "priority"]
    assert interrupted == plain_studies and answers == [plain_answer]
    assert all(plain_studies) and plain_answer, "the tiny model must produce some text"

    # Without a priority generator the question goes through plain model.generate.
    engine.attach_fast_generator(batch_gen, priority=None)
    answers.clear()
    engine.set_step_hook(hook)
    try:
        assert [r.text for r in engine.generate(studies)] == plain_studies
    finally:
        engine.set_step_hook(None)
    assert answers == [plain_answer] and used == ["batch", "priority", "batch"]


def study_request(shade: int, prompt: str, new_tokens: int) -> GenerationRequest:
    return GenerationRequest(
        images=[Image.new("RGB", (64, 48), color=(shade, shade, shade))],
        prompt=prompt,
        settings=GenerationSettings(max_new_tokens=new_tokens),
    )


def record_calls(generator: FastGreedyGenerator, name: str, used: list[str]) -> None:
    """A spy: notes ``name`` in ``used`` at each generate, then runs the real one."""
    original = generator.generate

    def recording(*args: Any, **kwargs: Any) -> torch.Tensor:
        used.append(name)
        return original(*args, **kwargs)

    generator.generate = recording  # type: ignore[method-assign]


def test_the_priority_generator_can_take_one_long_question(tmp_path: Path) -> None:
    # A question about a CT study asked during a batch: one row of long-prompt buffers of its
    # own, never more than the site's budget (0 keeps long prompts off the fast path).
    write_demo_model(tmp_path / "demo")
    budgets = []
    for configured in (100_000, 20_000, 0):
        settings = load_settings()
        settings.model = settings.model.model_copy(
            update={"max_batch": 2, "max_new_tokens": 8, "long_prompt_kv_tokens": configured}
        )
        engine = TransformersEngine(settings.model, weights_dir=tmp_path / "demo")
        engine.wants_fast_path = True
        attach_fast_path(engine, settings)
        batch_gen, priority = engine._fast_generator, engine._priority_generator
        assert isinstance(batch_gen, FastGreedyGenerator)
        assert isinstance(priority, FastGreedyGenerator)
        budgets.append((batch_gen.long_kv_tokens, priority.long_kv_tokens))

    assert budgets == [(100_000, PRIORITY_LONG_KV_TOKENS), (20_000, 20_000), (0, 0)]


def test_a_max_batch_whose_prompt_pass_runs_out_of_memory_fails_the_load_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The warm-up's full-batch prompt pass is where a max_batch too large for the GPU shows
    first (its memory cannot be exhausted on the CPU: the error is raised in its place)."""
    write_demo_model(tmp_path / "demo")
    settings = load_settings()
    settings.model = settings.model.model_copy(update={"max_batch": 2, "max_new_tokens": 4})
    engine = TransformersEngine(settings.model, weights_dir=tmp_path / "demo")
    engine.wants_fast_path = True

    def out_of_memory(*_: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(decode_joins, "warm_pass_shapes", out_of_memory)
    with pytest.raises(ModelLoadError, match="max_batch = 2 studies does not fit"):
        attach_fast_path(engine, settings)
    assert engine._fast_generator is None
