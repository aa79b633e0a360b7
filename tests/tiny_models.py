"""Tiny random MoE checkpoints built with transformers' own config classes (never downloaded).

Each saves ``model.safetensors``, ``config.json`` and a small byte-level BPE ``tokenizer.json``
trained here on a few sentences, so the whole export -> run path is exercised offline.
"""

from __future__ import annotations

from pathlib import Path

VOCAB = 320  # byte-level BPE needs the 256 bytes plus some merges
TEXT = [
    "Mixture of experts models route each token to a few experts.",
    "The quick brown fox jumps over the lazy dog while the router picks experts.",
    "Edge devices hold little memory, so experts are loaded from storage when needed.",
    "Quantization trades accuracy for size; shallow layers are often more sensitive.",
] * 20

COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=128, num_experts_per_tok=2, rms_norm_eps=1e-6, tie_word_embeddings=False,
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
)

ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
# DeepSeek: Multi-head Latent Attention (latent 16 + rope 8), 8 routed experts top-2 + shared ones,
# the first layer dense
DEEPSEEK = dict(
    vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, max_position_embeddings=128,
    kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
    num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96, first_k_dense_replace=1,
    rms_norm_eps=1e-6, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None,
)


def tiny_config(arch: str, **overrides):
    import transformers as tf

    if arch == "mixtral":
        cfg = tf.MixtralConfig(**{**COMMON, "num_local_experts": 8, "intermediate_size": 96, **overrides})
    elif arch == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**{**COMMON, "num_experts": 8, "moe_intermediate_size": 96, "intermediate_size": 128,
                                   "shared_expert_intermediate_size": 64, **overrides})
    elif arch == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(**{**COMMON, "num_experts": 8, "moe_intermediate_size": 96, "intermediate_size": 128,
                                   "head_dim": 32, "norm_topk_prob": True, **overrides})
    elif arch == "olmoe":
        cfg = tf.OlmoeConfig(**{**COMMON, "num_experts": 8, "intermediate_size": 96, **overrides})
    elif arch == "deepseek_v2":
        cfg = tf.DeepseekV2Config(**{**DEEPSEEK, "q_lora_rank": None, "n_shared_experts": 2, **overrides})
    elif arch == "deepseek_v3":
        cfg = tf.DeepseekV3Config(**{**DEEPSEEK, "q_lora_rank": 24, "n_shared_experts": 1, "n_group": 4,
                                     "topk_group": 2, **overrides})
    else:
        raise ValueError(arch)
    return cfg


def save_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(folder / "tokenizer.json"))


def make_tiny_model(arch: str, folder: Path, seed: int = 0, **overrides):
    """Build, randomise (std large enough for non-trivial routing) and save; return the model."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    cls = {"mixtral": tf.MixtralForCausalLM, "qwen2_moe": tf.Qwen2MoeForCausalLM,
           "qwen3_moe": tf.Qwen3MoeForCausalLM, "olmoe": tf.OlmoeForCausalLM,
           "deepseek_v2": tf.DeepseekV2ForCausalLM, "deepseek_v3": tf.DeepseekV3ForCausalLM}[arch]
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn_like(p))  # non-trivial norm weights catch mix-ups
            else:
                p.normal_(0.0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # V3: large enough to change the selection
                b.copy_(0.5 * torch.rand_like(b))
    folder = Path(folder)
    model.save_pretrained(folder)
    save_tokenizer(folder)
    return model
