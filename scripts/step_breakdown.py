# Where a shapes training step's time goes on CPU. Usage:
#   [ONE_EXPERT=1] [NO_ATT=1] [ATT=dot_product] python scripts/step_breakdown.py [mix]
# Times the jitted train step of the shapes_repro config (8 x 512 tokens, one row's mix,
# default additive) on real packed batches, after compiling. ONE_EXPERT=1 runs every token
# through the understanding expert only (what sparse MoT routing would save); NO_ATT=1
# replaces attention by the identity on q (what attention costs). Both change the model, so
# they are for timing only. SPARSE=gen,und times sparse MoT routing (model/routing.py) with
# those capacity fractions, which keeps the numbers (tests/test_scale_features.py).
import os, sys, time
from absl import flags; flags.FLAGS(["x"])
import jax
import flax.linen as nn
from strokes_jax.configs import shapes_repro
from strokes_jax.model import attention, mot, routing
from strokes_jax.train import loop, sharding as shd, step as sp

mixname = sys.argv[1] if len(sys.argv) > 1 else "additive"
c = shapes_repro.get_config()
if os.environ.get("ATT"):
    c.model.attention = os.environ["ATT"]
c.data.mix = dict(c.reproduce.mixes[mixname])
if os.environ.get("ONE_EXPERT"):
    mot._routed = lambda make, x, is_gen: make("und")(x)
if os.environ.get("NO_ATT"):
    attention.dot_product_attention = lambda q, k, v, mask: q
train_src, _ = loop.prepare_data(c, f"/tmp/step_breakdown_{mixname}")
s = loop.setup(c)
it = loop.train_iterator(c, s.etok, train_src, skips=None)
t0 = time.time()
host = [next(it) for _ in range(11)]
print(f"input: {(time.time() - t0) / 11:.3f} s/batch")
fractions = tuple(float(f) for f in os.environ.get("SPARSE", "").split(",") if f)
train_step, _ = sp.jit_steps(routing.sparse(s.model, fractions), s.tx, sp.LossConfig.from_config(c), s.mesh,
                             s.shardings)
with jax.set_mesh(s.mesh), nn.logical_axis_rules(shd.rules_tuple(c.rules)):
    batches = [loop._batch(b, s.mesh) for b in host]
    state, m = train_step(s.state, batches[0])  # compile
    jax.block_until_ready(m)
    t0 = time.time()
    for b in batches[1:]:
        state, m = train_step(state, b)
    jax.block_until_ready(m)
print(f"step: {(time.time() - t0) / 10:.3f} s")
