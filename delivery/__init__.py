"""Delivery: outbox rows to their destinations, one lane per destination.

worker.py       DeliveryWorker: a lane (core.loop.LoopThread) per enabled destination;
                claim, send, record; backoff and dead letters by the destination's retry
                policy (core.retry)
senders.py      SenderRegistry: the Sender bound to each destination's typed settings
file_sender.py  FileSender: a report's files into a directory, durably
http_sender.py  HttpSender: the JSON POSTed with an Idempotency-Key (RFC 9110)
metrics.py      DeliveryCounters and their Prometheus collector
scripted.py     ScriptedSender: the Sender double for tests
preparing_sender.py  PreparingSender: a Sender whose parcels' files are built first when
                missing (the PDF report and its Encapsulated PDF, on the first send)
pdf_report.py   PdfReportRenderer: the report as a PDF (WeasyPrint, templates/report.html.j2),
                Chinese or English; pdf_text.py what the page says (words, patient header,
                footer, appendix), pdf_fonts.py the Debian fonts it embeds, report_image.py
                the source image as the page shows it

The shared vocabulary (Parcel, DeliveryOutcome, the Sender protocol) is storage.delivery_types;
the DICOM and HL7 senders live beside their protocols (dicom_node.sender, hl7_out.sender).
"""
