"""Audit trail rows as DICOM audit messages (PS3.15 A.5, the format IHE ATNA uses).

    <AuditMessage>
      <EventIdentification EventActionCode EventDateTime EventOutcomeIndicator>
        <EventID csd-code codeSystemName="DCM" originalText/>
        <EventTypeCode .../>?
      </EventIdentification>
      <ActiveParticipant UserID UserIsRequestor NetworkAccessPointID? NetworkAccessPointTypeCode?>
        <RoleIDCode .../>
      </ActiveParticipant>+
      <AuditSourceIdentification AuditEnterpriseSiteID? AuditSourceID>
        <AuditSourceTypeCode .../>
      </AuditSourceIdentification>
      <ParticipantObjectIdentification ParticipantObjectID ParticipantObjectTypeCode
                                       ParticipantObjectTypeCodeRole>
        <ParticipantObjectIDTypeCode csd-code="110180" .../>   (Study Instance UID)
        <ParticipantObjectDetail type value/>                 (the node's event, base64 JSON)
      </ParticipantObjectIdentification>*

Codes are DICOM's (codeSystemName "DCM", PS3.16 CID 400-403 audit events and roles).
Patients appear in no message: studies by UID only, as in the node's own trail.
"""

from __future__ import annotations

import base64
import ipaddress
import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from storage.audit import FAILURE, REJECTED, ExportedEvent


@dataclass(frozen=True)
class Code:
    value: str
    meaning: str

    def element(self, parent: ET.Element, tag: str) -> ET.Element:
        return ET.SubElement(
            parent,
            tag,
            {"csd-code": self.value, "codeSystemName": "DCM", "originalText": self.meaning},
        )


# PS3.16 CID 400 Audit Event ID
APPLICATION_ACTIVITY = Code("110100", "Application Activity")
INSTANCES_ACCESSED = Code("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = Code("110104", "DICOM Instances Transferred")
STUDY_DELETED = Code("110105", "DICOM Study Deleted")
EXPORT = Code("110106", "Export")
SECURITY_ALERT = Code("110113", "Security Alert")
# PS3.16 CID 401 Audit Event Type Code
APPLICATION_START = Code("110120", "Application Start")
APPLICATION_STOP = Code("110121", "Application Stop")
NODE_AUTHENTICATION = Code("110126", "Node Authentication")
# PS3.16 CID 402 Audit Active Participant Role ID
APPLICATION = Code("110150", "Application")
SOURCE_ROLE = Code("110153", "Source Role ID")
DESTINATION_ROLE = Code("110152", "Destination Role ID")
STUDY_UID = Code("110180", "Study Instance UID")

OUTCOMES = {"success": "0", FAILURE: "4", REJECTED: "4", "dead": "8"}


@dataclass(frozen=True)
class EventCodes:
    event_id: Code
    action: str  # C create, R read, U update, D delete, E execute
    type_code: Code | None = None
    peer_role: Code | None = None  # the role of the event's actor, when it is a peer


def codes_for(kind: str) -> EventCodes:
    """The DICOM event of one of the node's audit kinds (storage/audit.py)."""
    if kind == "node.start":
        return EventCodes(APPLICATION_ACTIVITY, "E", APPLICATION_START)
    if kind == "node.stop":
        return EventCodes(APPLICATION_ACTIVITY, "E", APPLICATION_STOP)
    if kind == "dicom.association":
        return EventCodes(INSTANCES_TRANSFERRED, "C", None, SOURCE_ROLE)
    if kind.startswith("delivery."):
        return EventCodes(EXPORT, "R", None, DESTINATION_ROLE)
    if kind == "retention.prune":
        return EventCodes(STUDY_DELETED, "D")
    if kind in ("report.created", "report_appended", "study.version_created", "mpps.created"):
        return EventCodes(INSTANCES_ACCESSED, "C")
    if kind == "mpps.set":
        return EventCodes(INSTANCES_ACCESSED, "U")
    if kind == "api.access":
        return EventCodes(INSTANCES_ACCESSED, "R")
    return EventCodes(INSTANCES_ACCESSED, "E")  # job.*, conversation.*


def audit_message(item: ExportedEvent, *, source_id: str, site_id: str = "") -> bytes:
    """One AuditMessage (UTF-8 XML, no declaration) for one audit row."""
    codes = codes_for(item.kind)
    rejected = item.outcome == REJECTED
    if rejected and item.kind == "dicom.association":
        codes = EventCodes(SECURITY_ALERT, "E", NODE_AUTHENTICATION, SOURCE_ROLE)
    root = ET.Element("AuditMessage")
    outcome = "dead" if item.kind == "delivery.dead" else item.outcome
    event = ET.SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": codes.action,
            "EventDateTime": item.at.isoformat(),
            "EventOutcomeIndicator": OUTCOMES.get(outcome, "4"),
        },
    )
    codes.event_id.element(event, "EventID")
    if codes.type_code is not None:
        codes.type_code.element(event, "EventTypeCode")
    ET.SubElement(event, "EventOutcomeDescription").text = f"{item.kind} {item.outcome}"
    _participants(root, item, codes, source_id)
    source = ET.SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    if site_id:
        source.set("AuditEnterpriseSiteID", site_id)
    Code("4", "Application Server Process").element(source, "AuditSourceTypeCode")
    if item.study_instance_uid:
        _study(root, item)
    return ET.tostring(root, encoding="utf-8", xml_declaration=False)


def _participants(root: ET.Element, item: ExportedEvent, codes: EventCodes, node: str) -> None:
    # The node itself, then the peer or person that caused the event (when known).
    peer_requested = bool(item.actor) and codes.peer_role is not None
    own = ET.SubElement(
        root,
        "ActiveParticipant",
        {"UserID": node, "UserIsRequestor": "false" if peer_requested else "true"},
    )
    APPLICATION.element(own, "RoleIDCode")
    if not item.actor:
        return
    actor = ET.SubElement(
        root,
        "ActiveParticipant",
        {"UserID": item.actor, "UserIsRequestor": "true" if peer_requested or
         item.kind.startswith(("api.", "conversation.", "report_")) else "false"},
    )  # fmt: skip
    host = item.address.rsplit(":", 1)[0] if item.address.count(":") == 1 else item.address
    if host:
        actor.set("NetworkAccessPointID", host)
        actor.set("NetworkAccessPointTypeCode", "2" if _is_ip(host) else "1")
    if codes.peer_role is not None:
        codes.peer_role.element(actor, "RoleIDCode")


def _study(root: ET.Element, item: ExportedEvent) -> None:
    study = ET.SubElement(
        root,
        "ParticipantObjectIdentification",
        {
            "ParticipantObjectID": item.study_instance_uid or "",
            "ParticipantObjectTypeCode": "2",  # system object
            "ParticipantObjectTypeCodeRole": "3",  # report
        },
    )
    STUDY_UID.element(study, "ParticipantObjectIDTypeCode")
    detail = json.dumps({"kind": item.kind, "id": item.id, **item.detail}, default=str)
    ET.SubElement(
        study,
        "ParticipantObjectDetail",
        {"type": "medgemma-node-event", "value": base64.b64encode(detail.encode()).decode()},
    )


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
