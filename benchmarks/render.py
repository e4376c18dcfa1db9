"""Rendering a radiograph for the model: the direct LINEAR window beside pydicom's generic one.

``inference.preprocess.prepare_study`` reads a study's instances and renders each through the
PS3.4 grayscale pipeline. A window given as Window Center/Width with the LINEAR function (most
radiographs) is applied directly in float32; every other VOI transform goes through pydicom's
``apply_voi_lut``. This prints, for the same file in the same run, the time per study both
ways (median of ``--runs``) and the largest pixel difference between them.

    python -m benchmarks.render [--source RG1_UNCI.dcm] [--runs 20]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import numpy as np

from inference import preprocess
from peers.dicom_files import testdata


def seconds_per_study(source: Path, runs: int) -> tuple[float, np.ndarray]:
    """Median seconds of ``prepare_study`` on one file, and the last image's pixels."""
    times = []
    study = preprocess.prepare_study([source])  # warm: imports, decoders, page cache
    for _ in range(runs):
        started = time.perf_counter()
        study = preprocess.prepare_study([source])
        times.append(time.perf_counter() - started)
    return statistics.median(times), np.asarray(study.images[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=None, help="default: RG1_UNCI.dcm")
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    source = args.source or testdata("RG1_UNCI.dcm")
    direct_s, direct = seconds_per_study(source, args.runs)
    generic: Callable[..., None] = lambda _ds: None  # noqa: E731  every window through pydicom
    with mock.patch.object(preprocess, "_linear_window", generic):
        reference_s, reference = seconds_per_study(source, args.runs)
    difference = int(np.abs(direct.astype(int) - reference.astype(int)).max())
    print(f"{source.name}: {direct.shape[1]} x {direct.shape[0]} px rendered, {args.runs} runs")
    print(f"  direct LINEAR window  {direct_s * 1000:7.1f} ms/study")
    print(f"  pydicom apply_voi_lut {reference_s * 1000:7.1f} ms/study (reference, same run)")
    print(f"  speed-up {reference_s / direct_s:.2f}x, largest pixel difference {difference}")


if __name__ == "__main__":
    main()
