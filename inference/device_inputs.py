"""A batch's model inputs on the device, and batches prepared in pieces joined into one.

The inference worker builds batch N+1 while batch N generates. Its studies come due one by one
during a burst; preparing them all after the last one (the processor's text and image work,
the copy to the device: 0.8 s for 64 radiographs on an H200 host) kept the GPU waiting at the
start of every burst. ``JoiningEngine.join`` lets the worker prepare the studies in pieces
as they are rendered, then join the pieces when the batch is handed over.

A joined batch holds exactly the tensors one ``prepare`` of all its requests gives: the
processor pads a batch on the left to its longest prompt, so each piece's rows are padded
further on the left to the longest prompt of all pieces (``input_ids`` with the tokenizer's
pad id, every other per-token tensor with 0), and the images are stacked in request order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import BatchFeature

from inference.engine import GenerationRequest, JoinError, image_class

STACKED = "pixel_values"  # one entry per image, in request order


@dataclass
class DeviceInputs:
    """The processor's tensors for one prompt group, on the engine's device.

    ``indices``: the group's requests, as positions in the batch. ``ready``: recorded on the
    copy stream after the last copy (CUDA only); the generating stream waits for it before it
    reads the tensors.
    """

    tensors: Any  # transformers BatchFeature
    indices: list[int]
    ready: torch.cuda.Event | None = None


def _left_padded(tensor: torch.Tensor, length: int, value: int) -> torch.Tensor:
    return F.pad(tensor, (length - tensor.shape[1], 0), value=value)


def joined_tensors(groups: Sequence[Any], pad_id: int) -> BatchFeature:
    """The tensors of one prompt group's pieces as one processor call would give them."""
    keys = set(groups[0].keys())
    if any(set(g.keys()) != keys for g in groups) or "input_ids" not in keys:
        raise JoinError(f"pieces with other tensors: {sorted(keys)}")
    length = max(g["input_ids"].shape[1] for g in groups)
    joined: dict[str, torch.Tensor] = {}
    for key in sorted(keys):
        tensors = [g[key] for g in groups]
        if key == STACKED:
            joined[key] = torch.cat(tensors)
            continue
        if any(
            t.dim() != 2 or t.shape != g["input_ids"].shape
            for t, g in zip(tensors, groups, strict=True)
        ):
            raise JoinError(f"cannot pad {key!r}: not one value per prompt token")
        value = pad_id if key == "input_ids" else 0
        joined[key] = torch.cat([_left_padded(t, length, value) for t in tensors])
    return BatchFeature(data=joined)


def _left_padding_only(group: Any) -> None:
    mask = group.get("attention_mask")
    if mask is not None and mask.numel() and not bool(mask[:, -1].all()):
        raise JoinError("a piece is padded on the right")


def join_pieces(
    pieces: Sequence[tuple[list[GenerationRequest], list[DeviceInputs]]], pad_id: int
) -> tuple[list[GenerationRequest], list[tuple[list[int], BatchFeature]]]:
    """All pieces' requests in order, and each prompt group's (indices, joined tensors).

    Runs on the stream the pieces were made on (their tensors are used there)."""
    requests: list[GenerationRequest] = []
    by_class: dict[int, tuple[list[int], list[Any]]] = {}
    for piece_requests, groups in pieces:
        base = len(requests)
        requests.extend(piece_requests)
        for group in groups:
            _left_padding_only(group.tensors)
            indices, tensors = by_class.setdefault(
                image_class(piece_requests[group.indices[0]]), ([], [])
            )
            indices.extend(base + index for index in group.indices)
            tensors.append(group.tensors)
    joined = [(indices, joined_tensors(parts, pad_id)) for indices, parts in by_class.values()]
    return requests, joined
