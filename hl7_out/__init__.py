"""HL7 v2.5 output: the ORU^R01 result message and its delivery over MLLP.

oru.py          build_oru(): ReportDocument + source DICOM + OruHeader -> strictly validated
                ORU^R01; OruHeader (MSH-3..6, MSH-11, order number source); hl7_control_id()
dicom_source.py the patient, order and procedure attributes read from the source DICOM
encoding.py     ER7 escaping (§2.7) and DTM formatting
er7.py          Er7Message/Er7Segment: a message composed as ER7 text, segment by segment
pid.py          the PID segment (PID-3's identifier fallbacks, PID-5 names)
mllp.py         send_message(): one MLLP exchange -> DeliveryOutcome; the MLLPTransport seam
                and its real MLLPClient
scripted.py     ScriptedMLLP: the transport double for tests
sender.py       HL7OruSender: the delivery Sender of an HL7 destination (row -> ORU over MLLP)
ack.py          parse_ack(): MSA/ERR of the receiver's acknowledgment
"""
