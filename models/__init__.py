"""Model configs, the Llama-family architecture, loaders and the tokenizer."""
from fachat.models.config import ModelArgs
from fachat.models.loaders import default_model, load_model
from fachat.models.tokenizer import Tokenizer

__all__ = ["ModelArgs", "Tokenizer", "default_model", "load_model"]
