"""The node's one settings model.

Sources, highest priority first:
    1. environment variables ``MEDGEMMA_NODE_<KEY>`` (nested keys with ``__``, e.g.
       ``MEDGEMMA_NODE_DICOM__PORT=11112``);
    2. the TOML file given by ``--config PATH``;
    3. the defaults below (also documented in config/node.example.toml).
"""

from __future__ import annotations

import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from config.openai_settings import OpenAIServerSettings
from config.ops_settings import AuditSettings, RetentionSettings
from config.section import Section
from core.errors import ConfigError  # raised here; importable from here as before
from core.retry import RetryPolicy
from core.validation import error_key

ENV_PREFIX = "MEDGEMMA_NODE_"
# Report-building processes by default at most (README "GPU sizing"): each holds ~150 MB.
MAX_OUTPUT_PROCESSES = 16

# DICOM PS3.4 Annex B storage SOP classes accepted by default (CR, DX, CT, MR, SC).
DEFAULT_SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray Image Storage - For Processing
    "1.2.840.10008.5.1.4.1.1.2",  # CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
]

# SR and presentation states that PACS may echo back to us: accepted (so the sender sees
# Success) but stored aside and never re-processed (PS3.4 B.5: Basic/Enhanced/Comprehensive SR,
# Grayscale Softcopy Presentation State).
DEFAULT_IGNORED_SOP_CLASSES = [
    "1.2.840.10008.5.1.4.1.1.88.11",
    "1.2.840.10008.5.1.4.1.1.88.22",
    "1.2.840.10008.5.1.4.1.1.88.33",
    "1.2.840.10008.5.1.4.1.1.88.34",
    "1.2.840.10008.5.1.4.1.1.11.1",
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
]


def _check_ae_title(value: str) -> str:
    # PS3.5 §6.2: AE is at most 16 characters, no backslash or control characters.
    if not value.strip() or len(value) > 16 or "\\" in value or not value.isprintable():
        raise ValueError(f"{value!r} is not a valid AE title (1-16 printable characters)")
    return value


AETitle = Annotated[str, Field(min_length=1, max_length=16)]


class TLSSettings(Section):
    enabled: bool = False
    cert_file: Path | None = None
    key_file: Path | None = None
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _files_when_enabled(self) -> TLSSettings:
        if self.enabled and (self.cert_file is None or self.key_file is None):
            raise ValueError("tls.enabled needs cert_file and key_file")
        return self


class DicomSettings(Section):
    ae_title: AETitle = "MEDGEMMA"
    bind_address: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    allowed_calling_aets: list[str] = Field(default_factory=list)
    # Per receiving process: the kernel does not spread connections evenly, so a share of the
    # limit would refuse associations while other processes stand idle.
    max_associations: int = Field(default=10, ge=1)
    # Processes that receive on the port (Linux SO_REUSEPORT: the kernel spreads new
    # associations over them), so that large images arriving on several associations use
    # several cores. 0 = one per 4 CPU cores, at most 4 (1 on a small workstation).
    receive_processes: int = Field(default=0, ge=0, le=32)
    max_pdu: int = Field(default=262144, ge=0)
    # PS3.8 §9.1.5 ARTIM timer: a connection that sends no A-ASSOCIATE-RQ within this (or, with
    # TLS, does not finish its handshake) is closed; also bounds the wait for a release reply.
    acse_timeout_s: float = Field(default=30.0, gt=0)
    # The longest wait for the next DIMSE message of a C-STORE/C-ECHO under way.
    dimse_timeout_s: float = Field(default=60.0, gt=0)
    # An established association with no traffic for this long is aborted.
    network_timeout_s: float = Field(default=60.0, gt=0)
    # PS3.8 §9.3.4: associations addressed to another called AE title are rejected
    # (rejected-permanent, service-user, called-AE-title-not-recognized).
    require_called_aet: bool = True
    # Modality Performed Procedure Step SCP (PS3.4 F.7) on the same AE: a COMPLETED step whose
    # images have all arrived completes its study at once (dicom_node/mpps.py).
    mpps: bool = True
    accepted_sop_classes: list[str] = Field(default_factory=lambda: list(DEFAULT_SOP_CLASSES))
    ignored_sop_classes: list[str] = Field(
        default_factory=lambda: list(DEFAULT_IGNORED_SOP_CLASSES)
    )
    tls: TLSSettings = Field(default_factory=TLSSettings)

    @field_validator("ae_title")
    @classmethod
    def _ae(cls, value: str) -> str:
        return _check_ae_title(value)

    @field_validator("allowed_calling_aets")
    @classmethod
    def _aes(cls, values: list[str]) -> list[str]:
        return [_check_ae_title(v) for v in values]


class QuietRule(Section):
    """A study is complete once nothing has arrived for ``seconds``."""

    modality: str | None = None  # None: any modality
    calling_ae: str | None = None  # None: any sender
    seconds: float = Field(ge=0)


class CompletionSettings(Section):
    default_seconds: float = Field(default=15.0, ge=0)
    rules: list[QuietRule] = Field(
        default_factory=lambda: [
            QuietRule(modality="CR", seconds=5),
            QuietRule(modality="DX", seconds=5),
            QuietRule(modality="CT", seconds=30),
            QuietRule(modality="MR", seconds=30),
        ]
    )
    poll_interval_s: float = Field(default=0.5, gt=0)

    def quiet_seconds(self, modality: str, calling_ae: str) -> float:
        """Most specific rule wins: modality+AE, then AE, then modality, then the default."""
        best: tuple[int, float] | None = None
        for rule in self.rules:
            if rule.modality not in (None, modality) or rule.calling_ae not in (None, calling_ae):
                continue
            rank = (2 if rule.calling_ae else 0) + (1 if rule.modality else 0)
            if best is None or rank > best[0]:
                best = (rank, rule.seconds)
        return best[1] if best else self.default_seconds


class StorageSettings(Section):
    data_dir: Path = Path("data")
    database_url: str | None = None  # default: sqlite:///<data_dir>/node.db
    min_free_disk_mb: int = Field(default=1024, ge=0)
    phi_hash_salt: str = ""  # empty: a random salt kept in <data_dir>/.phi_salt


class ModelSettings(Section):
    # "scripted" answers from scripted_responses_file: a test double for pipelines without a
    # model, never for clinical use (every output is then marked as a test model).
    # "openai": each study goes to the inference server of [model.openai].
    engine: Literal["transformers", "scripted", "openai"] = "transformers"
    scripted_responses_file: Path | None = None
    model_id: str = "google/medgemma-1.5-4b-it"
    # A local directory with the weights; None: the local Hugging Face cache (HF_HUB_OFFLINE=1).
    model_path: Path | None = None
    quantization: Literal["none", "nf4", "int8"] = "none"
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    language: Literal["en", "zh"] = "en"
    prompts_dir: Path | None = None  # site templates that override the shipped ones
    max_new_tokens: int = Field(default=1024, ge=1)
    max_batch: int = Field(default=8, ge=1)
    batch_wait_ms: int = Field(default=20, ge=0)
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_s: float = Field(default=30.0, ge=0)
    lease_seconds: float = Field(default=600.0, gt=0)
    # An idle worker looks for jobs this often; the completion scheduler on this host also rings
    # its doorbell (storage/doorbell.py) the moment it queues one.
    poll_interval_s: float = Field(default=0.5, gt=0)
    fast_path: bool = True  # static KV cache + CUDA graphs on CUDA
    # Studies that come due while a batch decodes on the fast path join it in the rows its
    # bucket leaves free (inference/decode_joins.py), instead of waiting for the next batch.
    join_running_batch: bool = True
    # With render processes and nothing due, the worker runs studies still in their quiet
    # period and stores each answer only once its study is complete with the instances it
    # was made from, else drops it (inference/early_start.py): the GPU works through the
    # quiet period instead of waiting for it. Radiograph studies whose quiet period is at
    # most early_start_max_quiet_s; volumes (CT, MR) always wait.
    early_start: bool = True
    early_start_max_quiet_s: float = Field(default=10.0, ge=0)
    # Long prompts on the fast path (CT/MR: up to 85 slices, ~22,300 tokens; README "GPU
    # sizing"): the memory their buffers may take, in KV columns (rows x tokens) of every
    # layer. Local layers keep only their 1,024-token window there, so an 85-slice study takes
    # ~4,500 of them, not 24,576. None: a quarter of the GPU's memory (an H200: ~250,000, the
    # 8 studies of a full batch with room to spare); 0: long prompts go to plain
    # model.generate.
    long_prompt_kv_tokens: int | None = Field(default=None, ge=0)
    # Processes beside the inference worker (README "GPU sizing"): DICOM reading and rendering,
    # and storing reports with their SR/GSPS/ORU/JSON. None: for rendering a quarter of the CPU
    # cores, at most 4; for outputs one per core, at most 16 (they are idle until a batch ends;
    # then every core builds reports, so the last batch of a burst is stored sooner); none
    # below 4 cores. 0: in the worker's own threads (the GPU then waits while outputs are
    # built).
    render_processes: int | None = Field(default=None, ge=0)
    output_processes: int | None = Field(default=None, ge=0)
    # When no MedGemma weights are found: False keeps jobs queued (status says how to provide
    # weights); True writes and loads the tiny random demo model, loudly marked as a test model.
    demo_model_if_missing: bool = False
    weights_check_interval_s: float = Field(default=60.0, gt=0)
    openai: OpenAIServerSettings = Field(default_factory=OpenAIServerSettings)

    def processes(self) -> tuple[int, int]:
        """(render, output) processes, ``None`` settings resolved for this machine."""
        cores = os.cpu_count() or 1
        auto_render, auto_output = (
            (min(4, cores // 4), min(MAX_OUTPUT_PROCESSES, cores)) if cores >= 4 else (0, 0)
        )
        render = auto_render if self.render_processes is None else self.render_processes
        output = auto_output if self.output_processes is None else self.output_processes
        return render, output

    @model_validator(mode="after")
    def _engine_needs_its_settings(self) -> ModelSettings:
        if self.engine == "scripted" and self.scripted_responses_file is None:
            raise ValueError("model.engine = 'scripted' needs model.scripted_responses_file")
        if self.engine == "openai" and self.openai.base_url is None:
            raise ValueError("model.engine = 'openai' needs model.openai.base_url")
        return self


class InteractiveSettings(Section):
    """Questions and predict requests: a priority lane on the inference worker.

    The API queues them (storage/interactive.py; how many may wait is its own setting, passed
    to ``submit`` as ``max_queued``); the worker answers them before its next batch of studies
    (inference/interactive.py), and on the CUDA fast path between decode steps of the running
    batch (inference/lane_steps.py).
    """

    max_batch: int = Field(default=4, ge=1)  # requests the worker runs as one engine batch
    # Rounds of up to max_batch requests served before the next study batch, and at most as
    # many inside a running one: questions come first, yet a steady stream of them cannot
    # starve the study queue.
    max_rounds_between_batches: int = Field(default=4, ge=1)
    max_new_tokens: int = Field(default=384, ge=1)  # default answer length (capped by model's)
    wait_timeout_s: float = Field(default=120.0, gt=0)  # how long a caller waits for an answer
    poll_interval_s: float = Field(default=0.25, gt=0)  # waiting without the answer doorbell
    lease_seconds: float = Field(default=300.0, gt=0)  # a request whose worker died then fails


class PriorsSettings(Section):
    """``[priors]``: compare each study with the same patient's previous one from PACS.

    When a study's job starts, the worker asks the PACS (C-FIND, Study Root, STUDY level) for
    the same Patient ID (and Issuer of Patient ID), modality and body part before the study's
    date, takes the most recent within ``max_age_days`` and retrieves it (C-GET, or C-MOVE to
    ``move_destination_aet``) into the prior store (no job of its own). Everything is bounded
    by ``total_timeout_s``: a study never waits longer for its prior.
    """

    enabled: bool = False
    ae_title: AETitle = "PACS"  # the PACS's called AE title
    host: str = "127.0.0.1"
    port: int = Field(default=104, ge=1, le=65535)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    # "get": C-GET, images come back on the same association; "move": C-MOVE to
    # move_destination_aet, which the PACS must know with this node's host and DICOM port.
    mode: Literal["get", "move"] = "get"
    move_destination_aet: AETitle | None = None  # None: the node's own dicom.ae_title
    max_age_days: int = Field(default=730, ge=1)
    match_body_part: bool = True  # query Body Part Examined too (when the study has one)
    connect_timeout_s: float = Field(default=5.0, gt=0)  # association set-up (ACSE)
    query_timeout_s: float = Field(default=10.0, gt=0)  # each DIMSE response
    total_timeout_s: float = Field(default=30.0, gt=0)  # query + retrieve, per study

    @field_validator("ae_title", "move_destination_aet")
    @classmethod
    def _ae(cls, value: str | None) -> str | None:
        return None if value is None else _check_ae_title(value)


class RetrySettings(Section):
    """``[destinations.retry]``: when a destination's failed rows are tried again, and when
    they are given up on (dead-lettered)."""

    max_attempts: int = Field(default=20, ge=1)
    max_age_s: float = Field(default=86400.0, gt=0)
    initial_backoff_s: float = Field(default=2.0, ge=0)
    max_backoff_s: float = Field(default=600.0, gt=0)

    def policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.max_attempts,
            max_age_s=self.max_age_s,
            initial_backoff_s=self.initial_backoff_s,
            max_backoff_s=self.max_backoff_s,
        )


class DestinationBase(Section):
    name: str = Field(min_length=1, max_length=64)
    enabled: bool = True
    # Routing: empty lists mean "all".
    only_calling_aets: list[str] = Field(default_factory=list)
    only_modalities: list[str] = Field(default_factory=list)
    retry: RetrySettings = Field(default_factory=RetrySettings)

    def routes(self, modality: str, calling_ae: str) -> bool:
        """Whether a study of ``modality`` sent by ``calling_ae`` goes to this destination."""
        if self.only_calling_aets and calling_ae not in self.only_calling_aets:
            return False
        return not self.only_modalities or modality in self.only_modalities

    @property
    def wants_pdf(self) -> bool:
        """Whether this destination receives the report as a PDF (built on first delivery)."""
        return False


class DicomDestination(DestinationBase):
    kind: Literal["dicom"]
    ae_title: AETitle
    host: str
    port: int = Field(ge=1, le=65535)
    tls: TLSSettings = Field(default_factory=TLSSettings)
    send_gsps: bool = True
    # The report as an Encapsulated PDF (SOP Class 1.2.840.10008.5.1.4.1.1.104.1), built on the
    # first delivery and sent once like the SR.
    send_pdf: bool = False

    @property
    def wants_pdf(self) -> bool:
        return self.send_pdf


class HL7Destination(DestinationBase):
    kind: Literal["hl7"]
    host: str
    port: int = Field(ge=1, le=65535)
    # HL7 v2.5 HD namespace ids (MSH-3..6) are at most 20 characters.
    sending_application: str = Field(default="MEDGEMMA", min_length=1, max_length=20)
    sending_facility: str = Field(default="MEDGEMMA", min_length=1, max_length=20)
    receiving_application: str = Field(default="HIS", min_length=1, max_length=20)
    receiving_facility: str = Field(default="HOSPITAL", min_length=1, max_length=20)
    processing_id: Literal["P", "T", "D"] = "P"
    placer_from: Literal["accession", "study_uid"] = "accession"
    # PID-3 only from Patient ID (0010,0020) or Other Patient IDs (0010,1002): a study with
    # neither is not sent here (dead letter with the reason) instead of being sent with its
    # accession number as the identifier (hl7_out/pid.py).
    require_patient_id: bool = False
    connect_timeout_s: float = Field(default=10.0, gt=0)
    ack_timeout_s: float = Field(default=30.0, gt=0)
    tls: TLSSettings = Field(default_factory=TLSSettings)


class FileDestination(DestinationBase):
    kind: Literal["file"]
    directory: Path
    write_hl7: bool = True
    copy_dicom: bool = True
    # <study uid>_<report id>_report.pdf beside the JSON, built on the first delivery.
    write_pdf: bool = False

    @property
    def wants_pdf(self) -> bool:
        return self.write_pdf


class HttpDestination(DestinationBase):
    kind: Literal["http"]
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    bearer_token: str | None = None
    timeout_s: float = Field(default=30.0, gt=0)


Destination = Annotated[
    DicomDestination | HL7Destination | FileDestination | HttpDestination,
    Field(discriminator="kind"),
]


class IdentitySettings(Section):
    """The node as equipment and device observer in the objects it creates (PS3.3 C.7.5.1)."""

    device_name: str = Field(default="medgemma-node", min_length=1, max_length=64)
    institution_name: str | None = Field(default=None, max_length=64)
    serial_number: str | None = Field(default=None, max_length=64)
    # The organisation's UID root (PS3.5 §9.1), e.g. "1.2.826.0.1.3680043.10.1234.". Derived
    # UIDs stay deterministic either way, and include the installation id.
    # At most 40 characters leaves 24 digits for the derived suffix within the 64 of a UID.
    # Empty: 2.25.<UUID as integer> (PS3.5 B.2), with a warning at start.
    uid_root: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)*\.$", max_length=40)

    @field_validator("uid_root")
    @classmethod
    def _uid_root(cls, value: str | None) -> str | None:
        # PS3.5 §9.1: a component is "0" or starts with a non-zero digit.
        if value is not None and any(
            len(part) > 1 and part.startswith("0") for part in value.rstrip(".").split(".")
        ):
            raise ValueError(f"uid_root {value!r}: a component must not start with 0 (PS3.5 9.1)")
        return value


class ScopeSettings(Section):
    """Studies outside the scope their question was validated for (inference/scope.py):
    "flag" reports them with the generic question and says so in every output; "skip" makes
    no report and ends the job as skipped with the reason."""

    out_of_scope: Literal["flag", "skip"] = "flag"


class DeliverySettings(Section):
    # How often each destination's lane looks for due rows (retries, rows written on other
    # hosts); a worker on this host rings the delivery doorbell as soon as it writes rows.
    poll_interval_s: float = Field(default=0.5, gt=0)
    batch_size: int = Field(default=16, ge=1)  # rows of one destination sent per claim
    # A delivery worker that dies leaves its claimed rows leased this long (PostgreSQL; with
    # SQLite they are taken back at start). Must exceed the slowest batch.
    lease_s: float = Field(default=300.0, gt=0)


class MetricsSettings(Section):
    enabled: bool = True
    bind_address: str = "127.0.0.1"
    port: int = Field(default=9464, ge=0, le=65535)


class ApiSettings(Section):
    """The REST API (api/), served by uvicorn inside `serve`."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)  # 0: any free port (shown by `status`)
    # HTTPS: cert_file + key_file; ca_file + require_client_cert to ask for client certificates.
    tls: TLSSettings = Field(default_factory=TLSSettings)
    max_upload_mb: float = Field(default=64.0, gt=0)  # larger request bodies get 413
    max_question_chars: int = Field(default=2000, ge=1)  # longer questions get 422
    # Questions and predict requests waiting for the worker; beyond this, 429 with Retry-After.
    max_queued_questions: int = Field(default=32, ge=1)
    # "public": /api/docs and /api/openapi.json without a token (they hold no patient data);
    # "off": neither is served.
    docs: Literal["public", "off"] = "public"


class LoggingSettings(Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    file: Path | None = None  # default: <data_dir>/logs/node.log


class NodeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid"
    )

    dicom: DicomSettings = Field(default_factory=DicomSettings)
    completion: CompletionSettings = Field(default_factory=CompletionSettings)
    storage: StorageSettings = Field(default_factory=StorageSettings)
    model: ModelSettings = Field(default_factory=ModelSettings)
    destinations: list[Destination] = Field(default_factory=list)
    identity: IdentitySettings = Field(default_factory=IdentitySettings)
    scope: ScopeSettings = Field(default_factory=ScopeSettings)
    delivery: DeliverySettings = Field(default_factory=DeliverySettings)
    interactive: InteractiveSettings = Field(default_factory=InteractiveSettings)
    priors: PriorsSettings = Field(default_factory=PriorsSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    retention: RetentionSettings = Field(default_factory=RetentionSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)

    @model_validator(mode="after")
    def _unique_destination_names(self) -> NodeSettings:
        names = [d.name for d in self.destinations]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"destination names must be unique; repeated: {duplicates}")
        return self

    @property
    def free_space_target_mb(self) -> int:
        """Retention prunes settled studies down to this free space (0: twice the watermark)."""
        return self.retention.free_space_target_mb or 2 * self.storage.min_free_disk_mb

    @property
    def database_url(self) -> str:
        if self.storage.database_url:
            return self.storage.database_url
        return f"sqlite:///{(self.storage.data_dir / 'node.db').resolve()}"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Environment beats the file (passed as init kwargs), which beats the defaults.
        return (env_settings, init_settings)


def _environment_variable(location: tuple[int | str, ...]) -> str | None:
    """The MEDGEMMA_NODE_* variable that supplied the value at ``location``, if one did.

    pydantic-settings matches names case-insensitively and a variable may set a whole table
    (MEDGEMMA_NODE_DICOM='{...}'), so the longest matching prefix of the location wins.
    """
    present = {name.upper(): name for name in os.environ if name.upper().startswith(ENV_PREFIX)}
    for length in range(len(location), 0, -1):
        candidate = ENV_PREFIX + "__".join(str(part) for part in location[:length]).upper()
        if candidate in present:
            return present[candidate]
    return None


def _format_validation_error(exc: ValidationError, path: Path | None) -> str:
    """One line per bad key; a value that came from the environment names its variable."""
    lines = []
    from_file = False
    for error in exc.errors():
        location = tuple(error["loc"])
        key = error_key(location)
        variable = _environment_variable(location)
        if variable is None:
            from_file = True
            lines.append(f"{key}: {error['msg']}")
        else:
            # The value itself is left out: it may be a password or a token.
            lines.append(f"{key} (environment variable {variable}): {error['msg']}")
    if from_file and path is not None:
        source = f" in {path}"
    elif from_file:
        source = ""
    else:
        source = " in the environment"
    return f"invalid configuration{source}:\n" + "\n".join(lines)


def _format_settings_error(exc: SettingsError) -> str:
    """pydantic-settings could not parse a variable (a table or list that is not JSON)."""
    match = re.search(r'field "(\w+)"', str(exc))
    variable = _environment_variable((match.group(1),)) if match else None
    if match is None or variable is None:
        return f"invalid configuration in the environment: {exc}"
    return (
        "invalid configuration in the environment:\n"
        f"{match.group(1)} (environment variable {variable}): not valid JSON "
        "(tables and lists are given as JSON)"
    )


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc


def load_settings(path: Path | None = None, **overrides: Any) -> NodeSettings:
    """Load and validate; raise ConfigError with one line per bad key."""
    data = read_toml(path) if path is not None else {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        section, _, key = dotted.partition("__")
        data.setdefault(section, {})[key] = value
    try:
        return NodeSettings(**data)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc, path)) from exc
    except SettingsError as exc:
        raise ConfigError(_format_settings_error(exc)) from exc
