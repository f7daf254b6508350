"""Fine-tuning, linear probing and supervised curriculum training from pretrained encoders."""
