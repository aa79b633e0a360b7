"""dymoe.toolchain: read Hugging Face MoE checkpoints and write dymoe bundles."""
