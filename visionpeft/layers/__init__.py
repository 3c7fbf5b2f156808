"""Trainable layers the methods insert: LoRA / DoRA wrappers (``lora``) and bottleneck / convolutional adapter
modules (``adapters``). Torch only: nothing here knows a model library."""
