"""The Janus engine: pure PyTorch batched image synthesis and understanding. Never imports Ray.

The options it takes (ImageSampling, TextSampling, ScoreOptions) are in janus_batch/options.py, without torch.
"""

from janus_batch.engine.engine import GeneratedImage, JanusEngine, TextResult
from janus_batch.engine.scoring import ImageScore, Scorer

__all__ = ["GeneratedImage", "ImageScore", "JanusEngine", "Scorer", "TextResult"]
