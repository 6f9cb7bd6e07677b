"""CleanDIFT distillation: frozen teacher on noisy latents, student on clean latents."""
