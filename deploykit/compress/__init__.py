"""Model compression: pruning, knowledge distillation and quantization, one module each."""
