"""ViT fine-tuning example: model, official-checkpoint loader, data and training program."""
