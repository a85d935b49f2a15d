"""Pieces of the contract's responses that more than one handler builds."""

from __future__ import annotations

from golem_sidecar.decoding import FINISH_EOS, FINISH_LENGTH, FINISH_STOP
from golem_sidecar.gen import exam_pb2
from golem_sidecar.placement import Placement, effective_compute_dtype

# Why generation stopped, as the contract's enum says it.
FINISH_REASONS = {
    FINISH_LENGTH: exam_pb2.FINISH_REASON_LENGTH,
    FINISH_EOS: exam_pb2.FINISH_REASON_EOS,
    FINISH_STOP: exam_pb2.FINISH_REASON_STOP,
}


def quantization_info(placement: Placement) -> exam_pb2.Quantization:
    """The quantization a base was really loaded with: load_in_4bit always; with 4 bit every
    setting, and the dtype its 4-bit layers really compute in."""
    if not placement.load_in_4bit:
        return exam_pb2.Quantization(load_in_4bit=False)
    return exam_pb2.Quantization(
        load_in_4bit=True,
        bnb_4bit_compute_dtype=placement.compute_dtype,
        bnb_4bit_quant_type=placement.quant_type,
        bnb_4bit_use_double_quant=placement.double_quant,
        effective_compute_dtype=effective_compute_dtype(placement),
    )
