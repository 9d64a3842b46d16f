"""Models: the transformer (backbone + head + LoRA), its tiny preset, the one inference loop, k-mer models, probe."""
