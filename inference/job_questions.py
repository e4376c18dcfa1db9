"""The question each claimed study is asked (inference/worker.py): the study's validated
scope from its header (``[scope]``, inference/scope.py), its prior when ``[priors]`` is on
(inference/comparison.py), and the template that matches, the comparison template when there
is a prior."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from inference.comparison import (
    PriorInput,
    comparison_question,
    current_query,
    load_prior,
    without_prior,
)
from inference.preprocess import PreparedStudy
from inference.prompts import Prompt, PromptLibrary, PromptTemplateError
from inference.scope import StudyHeader, StudyOutOfScope, decide_scope
from inference.worker_jobs import JobSource, PreparedJob
from storage.priors import PriorFinder
from storage.report_schema import ScopeVerdict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobQuestions:
    prompts: PromptLibrary
    language: str
    out_of_scope: str  # [scope] out_of_scope: "flag" or "skip"
    prior_finder: PriorFinder | None
    data_dir: Path

    def prepared_job(
        self, source: JobSource, prepared: PreparedStudy, preprocess_seconds: float
    ) -> PreparedJob:
        scope = self.scope(source.paths) if source.paths else None
        prior = self.prior(source.paths, source.study_uid, prepared) if self.prior_finder else None
        in_scope = scope is None or scope.in_scope
        prompt, prior = self.question(prepared, source.calling_ae, prior, in_scope)
        question = prompt.text
        if prior is not None and prior.compared:
            question = comparison_question(prompt.text, prior.comparison)
        return PreparedJob(
            job_id=source.job_id,
            study_id=source.study_id,
            study_version_id=source.study_version_id,
            study_uid=source.study_uid,
            prepared=prepared,
            question=question,
            language=prompt.language,
            preprocess_seconds=preprocess_seconds,
            prior=prior,
            scope=scope,
            question_first=prompt.question_first,
        )

    def scope(self, paths: list[Path]) -> ScopeVerdict | None:
        """The study's scope from its first instance's header; None when it cannot be read
        (preprocessing then says why the study cannot be used). Raises StudyOutOfScope with
        the reason when the study is outside it and ``[scope] out_of_scope = "skip"``."""
        try:
            header = StudyHeader.of(dcmread(paths[0], stop_before_pixels=True))
        except Exception:
            return None
        scope = decide_scope(header, self.prompts.scope_rules)
        if not scope.in_scope and self.out_of_scope == "skip":
            raise StudyOutOfScope(scope.reason)
        return scope

    def prior(self, paths: list[Path], study_uid: str, prepared: PreparedStudy) -> PriorInput:
        assert self.prior_finder is not None
        query = current_query(paths, study_uid, prepared.modality, prepared.body_part)
        prior = load_prior(self.prior_finder, query, self.data_dir)
        log.info("study %s: %s", study_uid, prior.comparison.statement())
        return prior

    def question(
        self,
        prepared: PreparedStudy,
        calling_ae: str,
        prior: PriorInput | None,
        in_scope: bool = True,
    ) -> tuple[Prompt, PriorInput | None]:
        """The comparison template when there is a prior (and one matches), else the usual;
        outside the validated scope, only templates that declare no scope."""
        language = self.language
        if prior is not None and prior.compared:
            try:
                prompt = self.prompts.select(
                    prepared.modality,
                    prepared.body_part,
                    calling_ae,
                    language,
                    comparison=True,
                    in_scope=in_scope,
                )
                return prompt, prior
            except PromptTemplateError:
                prior = without_prior(prior, "no_template")
        prompt = self.prompts.select(
            prepared.modality, prepared.body_part, calling_ae, language, in_scope=in_scope
        )
        return prompt, prior
