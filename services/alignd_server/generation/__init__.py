"""GenerationService: sampling from the policy, versioned weight updates."""
