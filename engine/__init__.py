"""Engine, sessions, generation and sampling."""
from fachat.engine.engine import Engine
from fachat.engine.generate import Generation, GenerationStats, TextStream
from fachat.engine.sampling import SamplingParams
from fachat.engine.session import Session, Snapshot

__all__ = ["Engine", "Generation", "GenerationStats", "SamplingParams", "Session", "Snapshot", "TextStream"]
