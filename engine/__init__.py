"""Engine, generation and sampling."""
from fachat.engine.engine import Engine
from fachat.engine.generate import Generation, GenerationStats, TextStream
from fachat.engine.sampling import SamplingParams

__all__ = ["Engine", "Generation", "GenerationStats", "SamplingParams", "TextStream"]
