"""`medgemma-node predict PATH... --question TEXT`: one JSON line per (file, question).

Researchers, teachers and sites validating the model before a rollout have folders of DICOM,
PNG and JPEG files and a list of questions. This runs every pair through the node's own
predict path (medgemma_node/predict_answerers.py) on the configured engine, or through a
running node's API (``--api URL --token T``: its priority lane answers), with a progress bar
on stderr, and writes the JSONL file line by line (medgemma_node/predict_run.py: resumable,
a failure recorded and the run goes on, Ctrl-C leaves whole lines).

Exit status: 0 every pair answered; 1 some pairs failed (their lines say why), or the run
could not start or go on (no model, the node refused the token); 2 bad arguments;
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from config.settings import NodeSettings
from medgemma_node.predict_answerers import ApiAnswerer, LocalAnswerer
from medgemma_node.predict_run import (
    Answerer,
    PredictRunError,
    ResultsFile,
    RunSummary,
    find_files,
    plan_pairs,
    read_questions,
    run_pairs,
)

__all__ = ["PredictOptions", "PredictRunError", "predict_files", "read_questions"]

EXIT_OK, EXIT_FAILED, EXIT_INTERRUPTED = 0, 1, 130
LISTED_ERRORS = 20  # failed files named in the summary; the JSONL has every one


@dataclass(frozen=True)
class PredictOptions:
    paths: Sequence[Path]
    questions: Sequence[str]
    out: Path
    language: str | None = None  # "zh" | "en"; None: the question's, else [model] language
    max_new_tokens: int | None = None  # None: [interactive] max_new_tokens
    api_url: str | None = None
    token: str | None = None


class FilesRateAndEta(ProgressColumn):
    """Files per second and the time left, from the average since the start: pairs finish a
    batch at a time, so the rate between two updates says little."""

    def __init__(self, questions: int) -> None:
        super().__init__()
        self.questions = max(questions, 1)

    def render(self, task: Task) -> Text:
        elapsed = task.finished_time if task.finished else task.elapsed
        if not elapsed or not task.completed:
            return Text("- files/s, ETA -", style="progress.data.speed")
        pairs_per_s = task.completed / elapsed
        left_s = int(task.remaining / pairs_per_s) if task.remaining else 0
        eta = f"{left_s // 3600}:{left_s // 60 % 60:02d}:{left_s % 60:02d}"
        return Text(
            f"{pairs_per_s / self.questions:.2f} files/s, ETA {eta}", style="progress.data.speed"
        )


def progress_bar(console: Console, questions: int) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("pairs"),
        FilesRateAndEta(questions),
        TimeElapsedColumn(),
        console=console,
    )


def local_answerer(settings: NodeSettings, options: PredictOptions) -> LocalAnswerer:
    """The configured engine, loaded here (the demo model only when the settings allow)."""
    from inference.loader import EngineProvider  # torch and transformers load only here
    from inference.prompts import PromptLibrary

    provider = EngineProvider(settings)
    engine = provider()
    if engine is None:
        raise PredictRunError(str(provider.state.get("message", provider.state)))
    wanted = options.max_new_tokens or settings.interactive.max_new_tokens
    return LocalAnswerer(
        engine,
        PromptLibrary.from_settings(settings.model),
        default_language=settings.model.language,
        asked_language=options.language,
        max_new_tokens=min(wanted, settings.model.max_new_tokens),
        batch_size=settings.model.max_batch,
    )


def api_answerer(settings: NodeSettings, options: PredictOptions) -> ApiAnswerer:
    assert options.api_url is not None
    if not options.token:
        raise PredictRunError("--api needs --token (a radiologist's, from `api add-user`)")
    return ApiAnswerer(
        options.api_url,
        options.token,
        asked_language=options.language,
        max_new_tokens=options.max_new_tokens,
        batch_size=settings.interactive.max_batch,
    )


def predict_files(settings: NodeSettings, options: PredictOptions, console: Console) -> int:
    """The whole command; its exit status."""
    with ResultsFile(options.out) as results:
        files = find_files(options.paths, skip=options.out)
        pairs = plan_pairs(files, options.questions, results.done)
        skipped = len(files) * len(options.questions) - len(pairs)
        console.print(
            f"{len(files)} files x {len(options.questions)} questions: {len(pairs)} to ask, "
            f"{skipped} answered already in {escape(str(options.out))}"
        )
        if not pairs:
            return EXIT_OK
        answerer: Answerer = (
            api_answerer(settings, options)
            if options.api_url
            else local_answerer(settings, options)
        )
        try:
            with progress_bar(console, len(options.questions)) as progress:
                task = progress.add_task("predict", total=len(pairs))
                summary = run_pairs(pairs, answerer, results, lambda _pair: progress.advance(task))
        finally:
            if isinstance(answerer, ApiAnswerer):
                answerer.close()
    print_summary(summary, options.out, console)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED if summary.failed else EXIT_OK


def print_summary(summary: RunSummary, out: Path, console: Console) -> None:
    state = "interrupted" if summary.interrupted else "done"
    console.print(
        f"{state}: {summary.answered} answered, {summary.failed} failed "
        f"({len(summary.errors)} files); results in {escape(str(out))}"
    )
    for file, error in list(summary.errors.items())[:LISTED_ERRORS]:
        console.print(f"[yellow]failed[/yellow] {escape(file)}: {escape(error)}")
    if len(summary.errors) > LISTED_ERRORS:
        console.print(f"... and {len(summary.errors) - LISTED_ERRORS} more files (see the file)")
