"""The library API behind ``dymoe run``: open a bundle once, generate many times."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .bundle import Bundle
from .experts import ExpertExecutor, StaticExperts
from .generate import GenerationResult, generate
from .model import MoEModel
from .sampling import SamplingParams
from .tokenizer import StreamDecoder, TextTokenizer


@dataclass
class ModelSession:
    bundle: Bundle
    model: MoEModel
    tokenizer: TextTokenizer
    precision: str

    def generate(self, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stream: Callable[[str], object] | None = None) -> GenerationResult:
        ids = self.tokenizer.encode(prompt)
        decoder = StreamDecoder(self.tokenizer)
        on_token = (lambda t: stream(decoder.push(t))) if stream else None
        result = generate(self.model, ids, max_new_tokens, SamplingParams(temperature, top_p, seed),
                          on_token=on_token)
        if stream:
            stream(decoder.flush())
        return result

    def metrics(self, result: GenerationResult) -> dict:
        return {
            "bundle": str(self.bundle.path),
            "precision": self.precision,
            "prompt_tokens": len(result.prompt_ids),
            "new_tokens": len(result.token_ids),
            "ttft_s": result.ttft_s,
            "tpot_s": result.tpot_s,
            "token_times_s": result.token_times_s,
            "stop_reason": result.stop_reason,
            "prompt_ids": result.prompt_ids,
            "token_ids": result.token_ids,
            "text": self.tokenizer.decode(result.token_ids),
        }


def open_model(path: Path, precision: str | None = None, experts: ExpertExecutor | None = None,
               progress: bool = False) -> ModelSession:
    """Open a bundle; with no ``experts`` executor, all experts resident at ``precision``."""
    bundle = Bundle(path)
    precision = precision or bundle.precisions[0]
    tokenizer = TextTokenizer(bundle.tokenizer_path())
    model = MoEModel(bundle, experts or StaticExperts(bundle, precision, progress=progress))
    return ModelSession(bundle, model, tokenizer, precision)
