"""The published Z-Image-Turbo shapes (Tongyi-MAI/Z-Image-Turbo's config.json values), as data.

Used to size memory plans without a model folder (`zimage plan`, zimage.memory.sizes.published_model_sizes) and to
build full-size random-weight folders for the GPU benchmarks (zimage.weights.tiny).
"""

# transformer/config.json: diffusers' ZImageTransformer2DModel defaults with the published axes_lens.
FULL_TRANSFORMER = dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
                        axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512])
# text_encoder/config.json (Qwen3-4B as Qwen3Model); rope_theta 1e6, rms_norm_eps 1e-6, tied embeddings.
FULL_TEXT = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, max_position_embeddings=40960)
# vae/config.json (the Flux VAE as AutoencoderKL), the keys that set its size.
FULL_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32)
# ... and the keys it shares with the tiny stand-in: channels, block kinds, latent normalisation, no quant convs.
VAE_LAYOUT = dict(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611, shift_factor=0.1159,
                  use_quant_conv=False, use_post_quant_conv=False)
