"""The three networks of latent diffusion: CLIP text encoder, KL autoencoder, denoising UNet."""
