"""``[model.openai]``: the inference server of ``engine = "openai"`` (imported into
config/settings.py's ModelSettings)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from config.section import Section


class OpenAIServerSettings(Section):
    """``[model.openai]``: the inference server of ``engine = "openai"``.

    Any server with the OpenAI chat completions API that serves Gemma 3 with images (vLLM,
    SGLang, TGI). The API key is never written here: it is read from ``api_key_file`` or from
    the environment variable named by ``api_key_env``.
    """

    base_url: str | None = None  # e.g. "https://gpu-pool.example.org:8000/v1"
    model: str | None = None  # the served model name; None: the one model the server lists
    api_key_file: Path | None = None
    api_key_env: str | None = None
    connect_timeout_s: float = Field(default=10.0, gt=0)
    # Between bytes of the answer: the server answers once the whole report is generated.
    read_timeout_s: float = Field(default=300.0, gt=0)
    # Requests this node keeps in flight (batching is the server's job).
    max_concurrent_requests: int = Field(default=8, ge=1)
    # Images larger than the model's input are shrunk to it here (area interpolation, as
    # Google's DICOM handler does) rather than by the server: a quarter of the bytes to send.
    # 896: MedGemma's input side; 0: send them as preprocessed.
    max_image_side: int = Field(default=896, ge=0)
    ca_file: Path | None = None  # verify the server against this CA (default: system CAs)
    cert_file: Path | None = None  # client certificate, with key_file
    key_file: Path | None = None
    # While the server cannot be reached, jobs stay queued and it is tried again this often.
    check_interval_s: float = Field(default=10.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s) URL")
        if parts.username or parts.password:
            raise ValueError("credentials do not belong in the URL: use api_key_file/api_key_env")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _one_key_source_and_whole_cert(self) -> OpenAIServerSettings:
        if self.api_key_file is not None and self.api_key_env is not None:
            raise ValueError("set api_key_file or api_key_env, not both")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("a client certificate needs both cert_file and key_file")
        return self
