"""The real peers the tests and the benchmarks talk to, on loopback, and the node itself.

Development support, not part of the installed product (pyproject's package list leaves it out):

* ``peers.node_process``: `medgemma-node serve` as a subprocess with its own config, data dir
  and ports; the CLI as a subprocess;
* ``peers.orthanc``: a real Orthanc PACS (Debian's /usr/sbin/Orthanc), unprivileged;
* ``peers.mllp_listener``: a real MLLP listener (an HIS stand-in) that answers with ACKs;
* ``peers.dcmtk``: DCMTK's storescu and storescp (never pynetdicom's apps of the same name);
* ``peers.dicom_files``: real images bundled with pydicom / pydicom-data, copied as new studies;
* ``peers.net``: free loopback ports, bounded polling, a C-ECHO probe.
"""
