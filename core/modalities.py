"""Modality classes the node treats apart (DICOM PS3.3 C.7.3.1.1.1, Modality defined terms)."""

from __future__ import annotations

# Volumes: a study is stacks of slices. The worker sends up to 85 slices of one series as a single
# prompt (inference/preprocess.py), about 20 radiographs' worth of GPU time, so the job queue
# claims such studies in batches of their own (storage/jobs.py). CT first: a study with both is
# read as CT.
CROSS_SECTIONAL_MODALITIES = ("CT", "MR")
