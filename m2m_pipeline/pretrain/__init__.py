"""Self-supervised pretraining of the CPU presets' stand-in encoders (docs/model.md, "DINO stand-in pretraining")
and the hash-pinned manifest of the weights shipped under models/pretrained/."""
