"""Checkpoint converters: `keymap` (rules + reversible transforms + the streaming engine),
`bagel` (BAGEL-7B-MoT's ema.safetensors / ae.safetensors), `hf` (a Hugging Face Qwen2 decoder,
a diffusers FLUX autoencoder, an HF SigLIP vision tower) with `hf_config` (our configs from
their config.json), `writer` (tensors streamed into an Orbax checkpoint) and `output` (the
folder a conversion writes).

Conversion needs `safetensors` (not torch); it is imported only when a file is opened."""
