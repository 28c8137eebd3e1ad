"""Attention kernels behind one dispatch: `reference` (torch, CPU and oracle); GPU backends plug in here."""
from fachat.kernels.dispatch import BACKEND_ENV, decode_attention, prefill_attention, select_backend

__all__ = ["decode_attention", "prefill_attention", "select_backend", "BACKEND_ENV"]
