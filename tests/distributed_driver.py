"""Subprocess driver for the multi-device, multi-process and fault tests (XLA_FLAGS and
jax.distributed must be set before JAX starts, so these run in fresh interpreters).

  python tests/distributed_driver.py meshes OUT DATA MESH...   (8 forced CPU devices)
  python tests/distributed_driver.py worker OUT DATA WORKDIR PORT PID NPROC
  python tests/distributed_driver.py train OUT DATA WORKDIR STEPS [slow-save-from-step]
  python tests/distributed_driver.py converted OUT DATA WORKDIR CONVERTED   (8 devices, fsdp)
Each writes a JSON result to OUT.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def config(steps=4, **overrides):
    from strokes_jax.configs import shapes_tiny
    c = shapes_tiny.get_config("test")
    # kv_heads 2 so that a tensor axis of 2 divides every sharded parameter dimension.
    c.model.update(kv_heads=2)
    c.data.update(batch_size=8)
    c.train.update(steps=steps, log_every=1, eval_every=0, checkpoint_every=1)
    for k, v in overrides.items():
        node, key = c, k.split(".")
        for part in key[:-1]:
            node = node[part]
        node[key[-1]] = v
    return c


def sources(config_, data_dir):
    from strokes_jax.train import loop
    return loop.prepare_data(config_, data_dir)


def meshes(out, data_dir, *shapes):
    import jax
    from strokes_jax.train import loop
    res = {}
    for shape in shapes:
        dims = tuple(int(x) for x in shape.split(","))
        c = config(**{"mesh.shape": dims})
        n = 1
        for d in dims:
            n *= d
        s, summary = loop.train(c, os.path.join(data_dir, "run_" + shape.replace(",", "x")),
                                sources(c, data_dir), devices=jax.devices()[:n])
        q = s.state.params["decoder"]["layer_0"]["q_und"]["kernel"]
        res[shape] = {"losses": [l for _, l in summary["losses"]],
                      "q_shard_shape": list(q.addressable_shards[0].data.shape),
                      "q_shape": list(q.shape),
                      "embed_shard_shape": list(s.state.params["embed"].addressable_shards[0].data.shape)}
    json.dump(res, open(out, "w"))


def worker(out, data_dir, workdir, port, pid, nproc):
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=int(nproc), process_id=int(pid))
    from strokes_jax.train import loop
    c = config(**{"data.process_split": "rows"})
    _, summary = loop.train(c, workdir, sources(c, data_dir))
    json.dump({"losses": [l for _, l in summary["losses"]], "process": jax.process_index(),
               "devices": jax.device_count()}, open(out, "w"))


def _slow_saves_from(step_from: int):
    """Make every save from `step_from` on pause 30 s after writing its temporary directory,
    before the atomic rename, and drop a marker so the test can kill the process there."""
    from orbax.checkpoint._src.path import atomicity
    cls = atomicity.AtomicRenameTemporaryPath
    orig = cls.finalize

    async def finalize(self, *a, **kw):
        name = os.path.basename(str(self._final_path))
        if name.isdigit() and int(name) >= step_from:
            open(os.path.join(os.path.dirname(str(self._final_path)), "..", "SAVING"), "w").close()
            time.sleep(30)
        return await orig(self, *a, **kw)

    cls.finalize = finalize


def train(out, data_dir, workdir, steps, slow_from=None):
    if slow_from is not None:
        _slow_saves_from(int(slow_from))
    from strokes_jax.train import loop
    c = config(steps=int(steps))
    _, summary = loop.train(c, workdir, sources(c, data_dir))
    json.dump({"losses": summary["losses"], "start": summary["start_step"],
               "end": summary["end_step"], "preempted": summary["preempted"]}, open(out, "w"))


# The shapes model with BAGEL's heads: a velocity head and no canvas input, parameters BAGEL
# does not have.
BAGEL_SHAPED = {"model.prediction": "v", "model.canvas_skip": False}


def converted(out, data_dir, workdir, conv):
    """Step-0 outputs of converted weights read into an fsdp-sharded state (saved with the
    batch they were computed on), then 2 training steps from them."""
    import jax
    import numpy as np
    import flax.linen as nn
    from strokes_jax.train import loop, sharding as shd
    c = config(steps=2, **BAGEL_SHAPED, **{"mesh.shape": (1, 8, 1), "train.init_converted": conv})
    train_src, _ = sources(c, data_dir)
    s = loop.setup(c)
    loop._init_from(s, c)
    from strokes_jax.train import step as sp
    host = next(loop.train_iterator(c, s.etok, train_src, None))
    xt, t, _ = sp.noised_inputs(host, jax.random.PRNGKey(0), 1.0)
    inputs = {k: host[k] for k in ("tokens", "types", "positions", "segment_ids", "blocks",
                                   "patch_pos")}
    inputs.update(latents=np.asarray(xt), timesteps=np.asarray(t))
    with jax.set_mesh(s.mesh), nn.logical_axis_rules(shd.rules_tuple(c.rules)):
        logits, vel = jax.jit(lambda p, x: s.model.apply({"params": p}, **x))(s.state.params, inputs)
    embed = s.state.params["embed"]
    np.savez(out + ".npz", logits=np.asarray(logits), vel=np.asarray(vel), **inputs)
    _, summary = loop.train(c, workdir, (train_src, None))
    json.dump({"losses": [l for _, l in summary["losses"]],
               "embed_shard_shape": list(embed.addressable_shards[0].data.shape),
               "embed_shape": list(embed.shape)}, open(out, "w"))


if __name__ == "__main__":
    {"meshes": meshes, "worker": worker, "train": train,
     "converted": converted}[sys.argv[1]](*sys.argv[2:])
