"""The paper's recipe on BAGEL-7B-MoT : all weights fine-tuned,
10K steps of 33K-token packs, LR 2e-5 cosine, CE:MSE 0.25:1, AdamW 0.9/0.95/1e-15, clip 1.0.
Where the paper is silent, BAGEL's own SFT stage supplies the value (marked "BAGEL SFT").

Variants (`--config bagel7b_process:<arg>`):
  v5p   mesh for a v5p pod slice: FSDP over every chip (default; 64 chips = v5p-128)
  gpu8  mesh for 8 GPUs on one host (the paper's 8x H100)
  test  the same architecture shrunk to a few thousand parameters, for tests

Weights come from `python -m strokes_jax convert bagel` (ema.safetensors + ae.safetensors ->
Orbax); `python -m strokes_jax convert params --config bagel7b_process` prints the parameter counts.
"""

from strokes_jax.configs import schema


def get_config(arg: str | None = None):
    opts = schema.parse_arg(arg, v5p=False, gpu8=False, test=False)
    c = schema.defaults()

    # BAGEL's images: any size and aspect ratio, resized for the VAE path to at most 1024 and
    # at least 512 pixels a side in multiples of 16, and for the ViT path to 980 / 378 / 14
    # (sequence/images.py). Text through Qwen2's tokenizer.json and latents through the FLUX
    # AE, both from the conversion train.init_converted names unless set here.
    c.world.update(name="bagel", image_size=1024, min_image_size=512, patch=16, resize=True,
                   vit_max_image_size=980, vit_min_image_size=378, latents="ae")
    # Your episodes: --config.data.source=manifest (docs/data_format.md), parquet or webdataset
    # with its path; the default reads the shapes world's episodes, resized as above.

    c.data.update(
        seq_len=33_000,  # packed tokens per row (paper)
        batch_size=8,  # one pack per accelerator on 8 GPUs (paper); scaled per mesh below
        # CFG dropout of the conditions (BAGEL SFT; paper silent).
        cfg_dropout=dict(text=0.1, vit=0.5, vae=0.1),
        # Pack every image three times: noisy / clean latents / ViT tokens; the ViT patch
        # size and position table come from model.vision.
        vit_copies=True,
    )

    # Qwen2.5-7B decoder with a full generation expert (MoT); SigLIP2-so400m/14 with 26 of 27
    # layers; FLUX latents grouped 2x2 -> 64 values per token on a 64x64 table (1024 px).
    c.model.update(
        vocab_size=152_064, patch_dim=64, latent_grid=(64, 64),
        width=3584, depth=28, heads=28, kv_heads=4, head_dim=128, mlp=18_944,
        rope_theta=1_000_000.0, qk_norm=True, qkv_bias=True, norm_eps=1e-6, dtype="bfloat16",
        # One compiled layer for 28, and only layer inputs kept for the backward pass: a
        # 33K-token pack's activations do not fit otherwise.
        scan_layers=True, remat="full",
        prediction="v", canvas_skip=False,  # BAGEL's velocity head, no canvas input
        vision=dict(width=1152, depth=26, heads=16, mlp=4304, patch=14, channels=3,
                    max_side=70, norm_eps=1e-6, dtype="bfloat16"),
    )

    c.vae = dict(ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=16, in_channels=3,
                 out_ch=3, groups=32, scale_factor=0.3611, shift_factor=0.1159, dtype="bfloat16")

    c.flow.update(
        train_shift=4.0,  # BAGEL SFT timestep shift (paper silent)
        sample_shift=3.0, sample_steps=50,
    )

    c.optim.update(
        lr=2e-5, warmup_steps=500,  # warm-up: BAGEL SFT (paper silent)
        end_lr_factor=0.0,  # cosine to zero over train.steps
        eps=1e-15,
        ema_decay=0.995,  # BAGEL SFT
    )

    c.train.update(
        steps=10_000, log_every=10, eval_every=1000, checkpoint_every=500, keep_checkpoints=3,
        shard_tolerance=0.1, sparse_routing=(), tb_images=0,
    )

    # FSDP over the whole slice: bf16 params + fp32 Adam moments of 14B parameters do not fit
    # one chip, and the joint attention over 33K tokens favours sharding params, not sequence.
    c.mesh.shape = (1, -1, 1)

    # BAGEL's text-to-image CFG: text scale 4.0 on t in [0.4, 1.0], global renorm.
    c.eval.update(max_iterations=5, max_text_tokens=256, batch_size=8, images_per_prompt=4,
                  cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0),
                  cfg_renorm="global")

    if opts.gpu8:
        c.mesh.shape = (1, 8, 1)
        c.data.batch_size = 8
    elif opts.test:
        c.model.update(vocab_size=512, patch_dim=64, latent_grid=(4, 4), width=64, depth=2,
                       heads=4, kv_heads=2, head_dim=16, mlp=128, dtype="float32",
                       vision=dict(width=32, depth=2, heads=4, mlp=48, patch=14, channels=3,
                                   max_side=4, norm_eps=1e-6, dtype="float32"))
        # FLUX's 8x downsampling (four levels) at a fraction of its width: 16-pixel tokens.
        c.vae = dict(c.vae, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, dtype="float32")
        # 64-pixel pictures of the shapes world: 4 x 4 latent tokens, 4 x 4 ViT patches.
        c.world.update(image_size=64, min_image_size=32, vit_max_image_size=56,
                       vit_min_image_size=28)
        c.data.update(seq_len=512, batch_size=2, source="pictures", num_train=64, num_eval=16)
        c.train.update(steps=4, log_every=2, eval_every=2, checkpoint_every=2)
        c.flow.sample_steps = 3
        c.eval.update(prompts_per_tag=1, images_per_prompt=1, max_iterations=2,
                      max_text_tokens=24, batch_size=6, filmstrips=2)
        c.mesh.shape = (-1, 1, 1)
    else:  # v5p, the default
        c.data.batch_size = 64  # one 33K pack per v5p chip on a v5p-128 slice
    return c
