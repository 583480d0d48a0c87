"""Training methods: how the loss of one batch is computed (SFT is the default)."""
