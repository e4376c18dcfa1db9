"""A template's ``question_first`` reaches the prompt the model reads: from the template to the
job, to the request, to the chat text (TransformersEngine) and the chat messages (OpenAI)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from config.settings import ModelSettings
from inference.demo_model import write_demo_model
from inference.engine import ChatTurn, GenerationRequest, GenerationSettings
from inference.fast_decode import FastGreedyGenerator
from inference.job_questions import JobQuestions
from inference.openai_engine import chat_messages
from inference.predict import picture_source, predict_request
from inference.preprocess import PreparedStudy
from inference.prompts import PromptLibrary
from inference.transformers_engine import TransformersEngine
from inference.worker import InferenceWorker
from inference.worker_jobs import JobSource
from storage.db import Database
from tests.test_worker import make_settings

QUESTION = (
    "List every finding of this chest radiograph, each with its location, then the impression."
)


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> TransformersEngine:
    path = tmp_path_factory.mktemp("demo") / "tiny-gemma3"
    write_demo_model(path)
    return TransformersEngine(ModelSettings(model_path=path, device="cpu"))


def picture(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def request(
    seed: int, question_first: bool, history: list[ChatTurn] | None = None
) -> GenerationRequest:
    return GenerationRequest(
        images=[picture(seed)],
        prompt=QUESTION,
        settings=GenerationSettings(max_new_tokens=12),
        history=history or [],
        question_first=question_first,
    )


def test_the_job_carries_the_template_order(tmp_path: Path) -> None:
    site = tmp_path / "prompts"
    site.mkdir()
    (site / "chest.toml").write_text(
        'en = "q"\nquestion_first = true\n[match]\nmodality = "CR"\nbody_part = "CHEST"\n',
        encoding="utf-8",
    )
    questions = JobQuestions(PromptLibrary.load(site), "en", "flag", None, tmp_path)
    source = JobSource(1, 1, 1, "1.2.3", "MODALITY1", [])

    def job(modality: str) -> bool:
        study = PreparedStudy([], [], [], modality, "CHEST")
        return questions.prepared_job(source, study, 0.0).question_first

    assert job("CR") is True  # the site template: equal rank, the site's wins
    assert job("DX") is False  # the shipped chest template: images first
    # ... and the worker's request to the engine carries it.
    settings = make_settings(tmp_path, f"sqlite:///{tmp_path}/node.db", prompts_dir=site)
    worker = InferenceWorker(Database(settings.storage.database_url), settings, lambda: None)
    ordered = questions.prepared_job(source, PreparedStudy([], [], [], "CR", "CHEST"), 0.0)
    assert worker._request(ordered).question_first is True


def test_chat_text_puts_the_question_first_only_when_asked(engine: TransformersEngine) -> None:
    images_first = engine._chat_text(request(0, question_first=False))
    question_first = engine._chat_text(request(0, question_first=True))

    assert images_first.index("<start_of_image>") < images_first.index(QUESTION)
    assert question_first.index(QUESTION) < question_first.index("<start_of_image>")
    assert sorted(images_first) == sorted(question_first)  # the same text, reordered


def test_earlier_turns_keep_their_own_order(engine: TransformersEngine) -> None:
    history = [ChatTurn("user", "Earlier question?", [picture(1)]), ChatTurn("model", "Answer.")]
    text = engine._chat_text(request(0, question_first=True, history=history))

    first_image, second_image = (
        i for i in range(len(text)) if text.startswith("<start_of_image>", i)
    )
    assert first_image < text.index("Earlier question?")
    assert text.index("Answer.") < text.index(QUESTION) < second_image
    # A report asked question first, replayed by a conversation: its turn keeps that order.
    replayed = [ChatTurn("user", "Earlier question?", [picture(1)], question_first=True)]
    replayed.append(ChatTurn("model", "Answer."))
    text = engine._chat_text(request(0, question_first=False, history=replayed))
    first_image, second_image = (
        i for i in range(len(text)) if text.startswith("<start_of_image>", i)
    )
    assert text.index("Earlier question?") < first_image < text.index("Answer.")
    assert text.index("Answer.") < second_image < text.index(QUESTION)


def test_openai_messages_follow_the_same_order() -> None:
    for question_first, kinds in ((False, ["image_url", "text"]), (True, ["text", "image_url"])):
        content = chat_messages(request(0, question_first))[-1]["content"]
        assert [part["type"] for part in content] == kinds
    replayed = [ChatTurn("user", "Earlier?", [picture(1)], question_first=True)]
    messages = chat_messages(request(0, False, [*replayed, ChatTurn("model", "Answer.")]))
    assert [part["type"] for part in messages[0]["content"]] == ["text", "image_url"]
    assert [part["type"] for part in messages[-1]["content"]] == ["image_url", "text"]


def test_question_first_batch_through_the_engine_shares_its_prefix(
    engine: TransformersEngine,
) -> None:
    # The engine on CPU with the fast generator attached (as the loader does on CUDA): the
    # shared prefix runs, and the answers are those of plain generate.
    requests = [request(seed, question_first=True) for seed in range(3)]
    plain = engine.generate(requests)
    generator = FastGreedyGenerator(engine.model, max_batch=4, max_total_len=512)
    engine.attach_fast_generator(generator)
    try:
        fast = engine.generate(requests)
    finally:
        engine.attach_fast_generator(None)

    assert generator.shared_prefix.batches == 1
    assert generator.shared_prefix.last_length > len(QUESTION)
    assert [r.text for r in fast] == [r.text for r in plain]
    assert len({r.text for r in plain}) > 1  # the images differ, and so do the answers


def test_predict_asks_the_template_question_in_its_order_and_a_free_question_after_the_image(
    tmp_path: Path,
) -> None:
    site = tmp_path / "prompts"
    site.mkdir()
    (site / "default.toml").write_text('en = "q"\nquestion_first = true\n', encoding="utf-8")
    png = io.BytesIO()
    Image.new("RGB", (40, 30), "gray").save(png, format="PNG")
    source = picture_source(png.getvalue(), "png", PromptLibrary.load(site), "en")
    template, asked = predict_request(source, "", 16)
    assert (asked, template.question_first) == ("q", True)
    free, asked = predict_request(source, "Is there a fracture?", 16)
    assert (asked, free.question_first) == ("Is there a fracture?", False)
    shipped = picture_source(png.getvalue(), "png", PromptLibrary.load(None), "en")
    assert predict_request(shipped, "", 16)[0].question_first is False
