"""Where tokens and activations come from: models, running them, positions kept, token mixes, the store."""
