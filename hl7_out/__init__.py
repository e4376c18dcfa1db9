"""HL7 v2.5 output: the ORU^R01 result message and its delivery over MLLP.

oru.py          build_oru(): ReportDocument + source DICOM -> strictly validated ORU^R01
dicom_source.py the patient, order and procedure attributes read from the source DICOM
encoding.py     ER7 escaping (§2.7) and DTM formatting
mllp.py         send_message(): one MLLP exchange -> DeliveryOutcome; the HL7Sender seam
ack.py          parse_ack(): MSA/ERR of the receiver's acknowledgment
"""
