"""Model building blocks: encoder, predictor, diffusion decoder, teacher."""
