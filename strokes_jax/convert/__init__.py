"""Checkpoint converters: `keymap` (rules + reversible transforms + the streaming engine) and
`bagel` (BAGEL-7B-MoT's ema.safetensors / ae.safetensors -> Flax params, Orbax).

Conversion needs `safetensors` (not torch); it is imported only when a file is opened."""
