"""Delivery: outbox rows to their destinations, one lane per destination.

worker.py       DeliveryWorker: a lane (thread) per enabled destination; claim, send, record;
                backoff and dead letters by the destination's retry policy (core.retry)
senders.py      SenderRegistry: the Sender bound to each destination's typed settings
file_sender.py  FileSender: a report's files into a directory, durably
http_sender.py  HttpSender: the JSON POSTed with an Idempotency-Key (RFC 9110)
metrics.py      DeliveryCounters and their Prometheus collector
scripted.py     ScriptedSender: the Sender double for tests

The shared vocabulary (Parcel, DeliveryOutcome, the Sender protocol) is storage.delivery_types;
the DICOM and HL7 senders live beside their protocols (dicom_node.sender, hl7_out.sender).
"""
