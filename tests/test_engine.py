"""TransformersEngine on the tiny demo model (real load, batching, decoding), ScriptedEngine."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

from config.settings import ModelSettings
from inference.decode_joins import RowSource
from inference.demo_model import DEMO_MODEL_ID, DEMO_MODEL_MARKER, write_demo_model
from inference.engine import (
    GenerationRequest,
    GenerationResult,
    GenerationSettings,
    OutOfMemory,
    PreparedBatch,
)
from inference.parsing import parse_model_output
from inference.prefetch import Prefetcher
from inference.preprocess import attach_regions, prepare_study
from inference.prompts import PromptLibrary
from inference.scripted_engine import ScriptedEngine
from inference.transformers_engine import (
    ModelLoadError,
    TransformersEngine,
    _quantization_config,
    locate_weights,
    missing_weights_message,
    model_revision,
)
from storage.report_schema import ModelIdentity, ParseStatus, Urgency


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "tiny-gemma3"
    write_demo_model(path)
    return path


@pytest.fixture(scope="module")
def engine(demo_dir: Path) -> TransformersEngine:
    return TransformersEngine(ModelSettings(model_path=demo_dir, device="cpu", fast_path=True))


def picture(seed: int, size: tuple[int, int]) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, mode="RGB")


def request(image: Image.Image, prompt: str, limit: int) -> GenerationRequest:
    return GenerationRequest([image], prompt, GenerationSettings(max_new_tokens=limit))


class RecordingIds:
    """Wraps the engine's id generator to keep the new token ids of each call."""

    def __init__(self, engine: TransformersEngine) -> None:
        self.engine = engine
        self.inner = engine._generate_ids
        self.outputs: list[torch.Tensor] = []

    def __call__(self, inputs: Mapping[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        output = self.inner(inputs, max_new_tokens)
        self.outputs.append(output.clone())
        return output


def new_ids(output: torch.Tensor, row: int, count: int) -> list[int]:
    return [int(t) for t in output[row, :count]]


# --------------------------------------------------------------------------- demo model


def test_demo_model_is_written_deterministically(tmp_path: Path) -> None:
    write_demo_model(tmp_path / "a")
    write_demo_model(tmp_path / "b")
    digests = {
        hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest()
        for name in ("a", "b")
    }
    assert len(digests) == 1
    for name in ("config.json", "tokenizer.json", "processor_config.json", DEMO_MODEL_MARKER):
        assert (tmp_path / "a" / name).is_file(), name


def test_engine_identity_marks_the_test_model(engine: TransformersEngine) -> None:
    identity = engine.identity
    assert identity.is_test_model
    assert identity.model_id == DEMO_MODEL_ID
    assert identity.dtype == "float32" and identity.device == "cpu"
    assert identity.quantization == "none"
    assert identity.revision == model_revision(engine.weights_dir)
    assert identity.revision.startswith("sha256:") and len(identity.revision) == 19
    assert identity.library_versions["torch"] == torch.__version__
    assert identity.library_versions["transformers"]
    assert identity.display_name.startswith("TEST MODEL")
    assert not engine.wants_fast_path  # fast path is for CUDA only


def test_batch_of_two_images_with_left_padding(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = RecordingIds(engine)
    monkeypatch.setattr(engine, "_generate_ids", recorder)
    first = request(picture(1, (60, 90)), "Describe the chest radiograph.", 6)
    second = request(picture(2, (80, 80)), "Any nodule in the right upper zone of this image?", 10)

    results = engine.generate([first, second])

    assert len(results) == 2
    assert [r.batch_size for r in results] == [2, 2]
    assert 0 < results[0].new_tokens <= 6 and 0 < results[1].new_tokens <= 10
    assert results[0].prompt_tokens < results[1].prompt_tokens  # padded on the left
    assert results[0].seconds == results[1].seconds > 0
    assert engine.processor.tokenizer.padding_side == "left"
    for result in results:
        assert parse_model_output(result.text).parse_status in (
            ParseStatus.NARRATIVE_ONLY,
            ParseStatus.EMPTY,
        )

    batch_ids = recorder.outputs[-1]
    for row, alone in enumerate((first, second)):
        (single,) = engine.generate([alone])
        assert single.text == results[row].text
        assert single.new_tokens == results[row].new_tokens
        assert single.prompt_tokens == results[row].prompt_tokens
        count = single.new_tokens
        assert new_ids(recorder.outputs[-1], 0, count) == new_ids(batch_ids, row, count)


def test_the_image_changes_the_answer(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = RecordingIds(engine)
    monkeypatch.setattr(engine, "_generate_ids", recorder)
    prompt = "Describe this image."
    engine.generate([request(picture(3, (64, 64)), prompt, 8)])
    engine.generate([request(Image.new("RGB", (64, 64), "white"), prompt, 8)])
    assert not torch.equal(recorder.outputs[0], recorder.outputs[1])


def test_text_only_and_multi_image_requests(engine: TransformersEngine) -> None:
    text_only = GenerationRequest([], "Follow-up question?", GenerationSettings(max_new_tokens=3))
    two_images = GenerationRequest(
        [picture(4, (40, 40)), picture(5, (40, 60))], "Compare.", GenerationSettings(3)
    )
    results = engine.generate([text_only, two_images])
    assert [0 < r.new_tokens <= 3 for r in results] == [True, True]
    assert engine.generate([]) == []


def test_thinking_markers_survive_decoding(engine: TransformersEngine) -> None:
    tokenizer = engine.processor.tokenizer
    ids = tokenizer.encode("<unused94>thought ab<unused95>{}", add_special_tokens=False)
    assert engine._decode(ids) == "<unused94>thought ab<unused95>{}"
    assert "<unused95>" not in tokenizer.decode(ids, skip_special_tokens=True)


def test_out_of_memory_becomes_engine_out_of_memory(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(inputs: Mapping[str, torch.Tensor], max_new_tokens: int) -> torch.Tensor:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(engine, "_generate_ids", explode)
    with pytest.raises(OutOfMemory):
        engine.generate([request(picture(6, (32, 32)), "x", 2)])


def test_fast_generator_hook_replaces_generate(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    vocab = engine.processor.tokenizer.get_vocab()
    scripted = [vocab["O"], vocab["K"], vocab["<end_of_turn>"], vocab["<pad>"]]

    class Fixed:
        def generate(
            self,
            inputs: Mapping[str, torch.Tensor],
            max_new_tokens: int,
            *,
            between_steps: Callable[[], None] | None = None,
            joins: RowSource | None = None,
        ) -> torch.Tensor:
            rows = inputs["input_ids"].shape[0]
            return torch.tensor([scripted] * rows)

    engine.attach_fast_generator(Fixed())
    try:
        (result,) = engine.generate([request(picture(7, (32, 32)), "x", 8)])
    finally:
        engine.attach_fast_generator(None)
    assert (result.text, result.new_tokens) == ("OK", 3)


def test_prepare_then_generate_prepared_equals_generate(
    engine: TransformersEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Token for token, also with prepare in a second thread (as the worker pipelines)."""
    recorder = RecordingIds(engine)
    monkeypatch.setattr(engine, "_generate_ids", recorder)
    requests = [
        request(picture(11, (50, 70)), "Describe the chest radiograph.", 7),
        request(picture(12, (64, 64)), "Any pleural effusion on this frontal view?", 9),
    ]
    direct = engine.generate(requests)
    in_series = engine.generate_prepared(engine.prepare(requests))
    prefetcher: Prefetcher[PreparedBatch] = Prefetcher("test-prepare")
    prefetcher.start(lambda: engine.prepare(requests))
    ahead = prefetcher.take()
    prefetcher.close()
    assert ahead is not None
    in_thread = engine.generate_prepared(ahead)

    def comparable(results: list[GenerationResult]) -> list[tuple[str, int, int, int]]:
        return [(r.text, r.prompt_tokens, r.new_tokens, r.batch_size) for r in results]

    assert comparable(in_series) == comparable(in_thread) == comparable(direct)
    first, *others = recorder.outputs
    assert len(others) == 2 and all(torch.equal(first, other) for other in others)
    assert ahead.seconds > 0 and in_thread[0].seconds >= ahead.seconds
    assert engine.generate_prepared(engine.prepare([])) == []


# --------------------------------------------------------------------------- weights


def test_locate_weights_in_an_empty_directory(tmp_path: Path) -> None:
    settings = ModelSettings(model_path=tmp_path)
    assert locate_weights(settings) is None
    message = missing_weights_message(settings)
    assert str(tmp_path) in message
    assert "huggingface-cli download google/medgemma-1.5-4b-it" in message
    assert "model.model_path" in message
    with pytest.raises(ModelLoadError, match=str(tmp_path)):
        TransformersEngine(settings)


def test_locate_weights_in_the_hugging_face_cache(
    demo_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    settings = ModelSettings(model_id="google/medgemma-1.5-4b-it")
    repo = tmp_path / "models--google--medgemma-1.5-4b-it"
    assert locate_weights(settings) is None
    assert str(repo) in missing_weights_message(settings)

    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(demo_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    found = locate_weights(settings)
    assert found == repo / "snapshots" / commit
    assert model_revision(found) == commit
    # model_path may also name the cache folder itself.
    assert locate_weights(ModelSettings(model_path=repo)) == found


def test_quantization_needs_cuda(demo_dir: Path) -> None:
    settings = ModelSettings(model_path=demo_dir, device="cpu", quantization="nf4")
    with pytest.raises(ModelLoadError, match="needs a CUDA device"):
        TransformersEngine(settings)


def damaged_copy(demo_dir: Path, tmp_path: Path, name: str, keep_bytes: int) -> Path:
    """The demo model with one file cut short (an interrupted copy of the weights)."""
    copy = Path(shutil.copytree(demo_dir, tmp_path / "damaged"))
    damaged = next(copy.glob(name))
    damaged.write_bytes(damaged.read_bytes()[:keep_bytes])
    return copy


def test_truncated_weights_are_a_model_load_error(demo_dir: Path, tmp_path: Path) -> None:
    weights = damaged_copy(demo_dir, tmp_path, "*.safetensors", keep_bytes=4096)
    with pytest.raises(ModelLoadError, match="cannot load the model from") as caught:
        TransformersEngine(ModelSettings(model_path=weights, device="cpu"))
    assert type(caught.value.__cause__).__name__ == "SafetensorError"


def test_a_malformed_tokenizer_is_a_model_load_error(demo_dir: Path, tmp_path: Path) -> None:
    weights = damaged_copy(demo_dir, tmp_path, "tokenizer.json", keep_bytes=100)
    with pytest.raises(ModelLoadError, match="cannot load the processor from"):
        TransformersEngine(ModelSettings(model_path=weights, device="cpu"))


# --------------------------------------------------------------------------- scripted engine


def test_scripted_engine_answers_in_order_and_splits_on_oom() -> None:
    scripted = ScriptedEngine(texts=["first", "second"], oom_above=1)
    requests = [request(picture(8, (8, 8)), "q", 5), request(picture(9, (8, 8)), "q", 5)]
    with pytest.raises(OutOfMemory):
        scripted.generate(requests)
    answers = [scripted.generate([r])[0].text for r in requests]
    assert answers == ["first", "second"]
    assert scripted.identity.is_test_model
    with pytest.raises(RuntimeError, match="no scripted text left"):
        scripted.generate([requests[0]])


def test_scripted_engine_with_a_responder_and_identity() -> None:
    identity = ModelIdentity(model_id="google/medgemma-1.5-4b-it", revision="abc")
    scripted = ScriptedEngine(responder=lambda r: f"{len(r.images)} image(s)", identity=identity)
    (result,) = scripted.generate([request(picture(10, (8, 8)), "q", 5)])
    assert result.text == "1 image(s)" and result.batch_size == 1
    assert scripted.identity.model_id == "google/medgemma-1.5-4b-it"
    assert len(scripted.calls) == 1


def test_quantization_without_bitsandbytes_says_how_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "bitsandbytes" else real_find_spec(name, *a),
    )
    with pytest.raises(ModelLoadError, match=r"medgemma-node\[quantization\]"):
        _quantization_config("int8", torch.device("cuda", 0))


# --------------------------------------------------------------------------- whole path


def test_files_to_request_to_regions(tmp_path: Path) -> None:
    """prepare_study -> prompt -> engine -> parse -> attach_regions, as the worker does it."""
    pixels = np.tile(np.arange(100, dtype=np.uint16) * 40, (200, 1))  # 200 rows x 100 columns
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    path = tmp_path / "cxr.dcm"
    ds.save_as(path, enforce_file_format=True)

    study = prepare_study([path])
    prompt = PromptLibrary().select(study.modality, study.body_part, "STATION1", "en")
    answer = (
        '```json\n{"findings": [{"label": "nodule", "box_2d": [100, 250, 200, 500]}], '
        '"impression": "Nodule.", "recommendation": "CT.", "urgency": "urgent"}\n```'
    )
    scripted = ScriptedEngine(texts=[answer])
    (result,) = scripted.generate(
        [GenerationRequest(study.images, prompt.text, GenerationSettings(max_new_tokens=256))]
    )
    content = parse_model_output(result.text, prompt.language, image_count=len(study.images))
    content = attach_regions(content, study.geometries)

    assert prompt.template_name == "chest_xray"
    (finding,) = content.findings
    assert finding.region is not None
    assert finding.region.sop_instance_uid == ds.SOPInstanceUID
    # Square of 200 with the 100 columns centred (offset 50): x 50..100 -> 0..50, y 20..40.
    assert (finding.region.x0, finding.region.y0, finding.region.x1, finding.region.y1) == (
        0,
        20,
        50,
        40,
    )
    assert content.urgency == Urgency.URGENT
