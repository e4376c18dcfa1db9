"""The node's one exception root.

Every exception the project raises derives from ``NodeError``; where callers rely on a built-in
type (``ValueError``, ``RuntimeError``) that type stays as a second base. Third-party errors are
wrapped where they enter the node (``raise SomeNodeError(...) from exc``).

    NodeError
    ├── ConfigError            config/settings.py: the configuration cannot be used
    │                          (importable from config.settings as well)
    ├── StorageError           storage/: files and database
    │   └── DatabaseUnavailable    storage/db.py: SQLAlchemy's OperationalError, wrapped
    ├── DicomError             dicom_node/: SCP, SCU, SR/GSPS/PDF builders
    │   ├── StoreRejected          a C-STORE answered with a DIMSE failure status
    │   └── AssociationFailed      the peer could not be reached or rejected us
    ├── InferenceError         inference/: preprocessing, prompts, engine, worker
    │   ├── PreprocessError        (ValueError) the image cannot be used
    │   ├── PromptTemplateError    (ValueError) a question template is unusable
    │   ├── ModelLoadError         (RuntimeError) weights missing or unloadable
    │   ├── OutOfMemory            (RuntimeError) the device ran out of memory
    │   ├── PermanentJobError      retrying cannot help
    │   ├── StudyOutOfScope        outside the validated scope, skipped by setting
    │   ├── EngineUnavailable      the inference server cannot be reached or used: jobs wait
    │   ├── EngineRequestFailed    one request to it failed; retried (its Retry-After at least)
    │   │   └── EngineRequestRejected  it refused the request itself: retrying cannot help
    │   └── BatchPartlyFailed      some requests of a batch failed: per-request outcomes
    ├── HL7Error               hl7_out/: ORU, ACK, MLLP
    │   ├── OruBuildError          (ValueError) the message cannot be built
    │   ├── AckParseError          (ValueError) the peer's ACK is not HL7
    │   └── _DeliveryFailed        hl7_out/mllp.py, internal: the MLLP exchange failed
    ├── DeliveryError          delivery/: outbox lanes and senders
    └── ApiError               api/: the REST API
"""

from __future__ import annotations


class NodeError(Exception):
    """The root of every exception the node raises."""


class ConfigError(NodeError):
    """The configuration cannot be used; ``str()`` names each bad key."""


class StorageError(NodeError):
    """Files or the database could not be read or written."""


class DicomError(NodeError):
    """A DICOM network or object-building failure."""


class InferenceError(NodeError):
    """Preprocessing, prompting or running the model failed."""


class HL7Error(NodeError):
    """An HL7 message could not be built, sent or understood."""


class DeliveryError(NodeError):
    """A delivery to a destination could not be made."""


class ApiError(NodeError):
    """A REST API request cannot be served."""
